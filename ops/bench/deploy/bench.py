"""Issue 10's deploy benchmarks, the measuring half (run.sh starts the cluster).

Every push is a real `git push` over the gitserver's sshd, and every request a
real HTTP request through the balancer (Host: APP.localhost). The app answers
its VERSION file, which each push changes, so a response says which release
served it.
"""
import http.client, json, os, statistics, subprocess, sys, threading, time

work, n = sys.argv[1], int(sys.argv[2])
dev = os.path.join(work, "dev")
operator = dict(os.environ, PADDOCK_CONFIG=os.path.join(dev, "paddock.toml"))
home = os.path.join(work, "home")
os.makedirs(home)
customer = {k: v for k, v in os.environ.items() if k != "PADDOCK_CONFIG"}
customer.update(HOME=home, XDG_CONFIG_HOME=os.path.join(home, "xdg"))


def run(args, env, cwd=None, check=True):
    p = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True)
    if check and p.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{p.stdout}{p.stderr}")
    return p


# The balancer's HTTP address, from the cluster file.
import tomllib

with open(os.path.join(dev, "paddock.toml"), "rb") as f:
    cfg = tomllib.load(f)
bal = cfg["daemons"]["balancer"]["http"].replace("tcp://", "")
bal_host, bal_port = bal.rsplit(":", 1)

creds = os.path.join(work, "bench.credentials")
with open(creds, "w") as f:
    f.write(run(["paddock", "users", "create", "bench"], operator).stdout)
run(["paddock", "login", "--credentials", creds], customer)
key = os.path.join(home, "id_ed25519")
run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], customer)
run(["paddock", "keys", "add", key + ".pub"], customer)
customer["GIT_SSH_COMMAND"] = (
    f"ssh -i {key} -o IdentitiesOnly=yes -o BatchMode=yes "
    "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
)

SERVER = (
    "import http.server, os\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    protocol_version = 'HTTP/1.1'\n"
    "    disable_nagle_algorithm = True\n"
    "    def log_message(self, *a): pass\n"
    "    def do_GET(self):\n"
    "        body = open('VERSION', 'rb').read()\n"
    "        self.send_response(200)\n"
    "        self.send_header('Content-Length', str(len(body)))\n"
    "        self.end_headers(); self.wfile.write(body)\n"
    "http.server.ThreadingHTTPServer(('0.0.0.0', int(os.environ['PORT'])), H).serve_forever()\n"
)


def make_app(app):
    url = json.loads(run(["paddock", "--json", "apps", "create", app], customer).stdout)
    url = url.get("git_url") or url.get("app", {}).get("git_url")
    tree = os.path.join(work, app)
    os.makedirs(tree)
    for name, body in {"Procfile": "web: python3 server.py\n", "server.py": SERVER,
                       "VERSION": "v0"}.items():
        with open(os.path.join(tree, name), "w") as f:
            f.write(body)
    g = lambda *a: run(["git", *a], customer, cwd=tree)
    g("init", "-q", "-b", "main")
    g("config", "user.email", "bench@example.com")
    g("config", "user.name", "bench")
    g("add", "-A")
    g("commit", "-qm", "first")
    g("remote", "add", "paddock", url)
    return tree


def push(tree, version):
    with open(os.path.join(tree, "VERSION"), "w") as f:
        f.write(version)
    run(["git", "commit", "-qam", version], customer, cwd=tree)
    t0 = time.monotonic()
    p = run(["git", "push", "paddock", "main"], customer, cwd=tree, check=False)
    return t0, time.monotonic(), p


def get(conn, host):
    conn.request("GET", "/", headers={"Host": host})
    r = conn.getresponse()
    return r.status, r.read()


# ---- 1. push → first 200 from the new release ------------------------------
app = "bench-first"
host = f"{app}.localhost"
tree = make_app(app)
t0, t1, p = push(tree, "warmup")
if p.returncode != 0:
    sys.exit(f"the first push failed:\n{p.stderr}")
rows = []
for i in range(n):
    version = f"first-{i}"
    seen = {}
    stop = threading.Event()

    def poll():
        conn = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(bal_host, int(bal_port), timeout=5)
                status, body = get(conn, host)
                if status == 200 and body.decode() == version and "at" not in seen:
                    seen["at"] = time.monotonic()
            except Exception:
                conn = None
            time.sleep(0.002)

    th = threading.Thread(target=poll)
    th.start()
    t0, t1, p = push(tree, version)
    deadline = time.monotonic() + 10
    while "at" not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    th.join()
    if p.returncode != 0 or "at" not in seen:
        sys.exit(f"push {i} failed or never served:\n{p.stderr}")
    first = (seen["at"] - t0) * 1000
    rows.append({"first200": first, "push": (t1 - t0) * 1000})
    print(f"push #{i + 1}: first 200 from {version} after {first:.0f} ms; push returned after {(t1 - t0) * 1000:.0f} ms", flush=True)

print()
print(f"push → first 200 from the new release, p50 of {n}: "
      f"{statistics.median(r['first200'] for r in rows):.0f} ms "
      f"(min {min(r['first200'] for r in rows):.0f}, max {max(r['first200'] for r in rows):.0f}); "
      f"the whole push (rollout done, old instances drained): "
      f"{statistics.median(r['push'] for r in rows):.0f} ms")
print("goal: < 2000 ms")

# ---- 2. a rolling deploy of web=4 under 64 concurrent clients --------------
app = "bench-roll"
host = f"{app}.localhost"
tree = make_app(app)
t0, t1, p = push(tree, "r0")
if p.returncode != 0:
    sys.exit(f"the first push failed:\n{p.stderr}")
run(["paddock", "ps", "scale", "web=4", "-a", app], customer)
CLIENTS = 64
for round_ in range(1, 3):
    version = f"r{round_}"
    counts = {"ok": 0, "old": 0, "new": 0, "failed": 0}
    errors = []
    lock = threading.Lock()
    stop = threading.Event()

    def client():
        conn = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(bal_host, int(bal_port), timeout=30)
                status, body = get(conn, host)
                with lock:
                    if status == 200:
                        counts["ok"] += 1
                        counts["new" if body.decode() == version else "old"] += 1
                    else:
                        counts["failed"] += 1
                        if len(errors) < 5:
                            errors.append(f"status {status}: {body[:100]!r}")
            except Exception as e:
                with lock:
                    counts["failed"] += 1
                    if len(errors) < 5:
                        errors.append(repr(e))
                conn = None

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(1)
    t0, t1, p = push(tree, version)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    if p.returncode != 0:
        sys.exit(f"the rolling push failed:\n{p.stderr}")
    print(f"rolling deploy #{round_} of web=4 under {CLIENTS} clients: push {1000 * (t1 - t0):.0f} ms; "
          f"requests ok {counts['ok']} (old release {counts['old']}, new {counts['new']}), "
          f"failed {counts['failed']} {errors}", flush=True)
print("goal: 0 failed requests")

# ---- 3. another app's latency while one crash-loops ------------------------
# bench-first (web=1) measured through the balancer, alone and then while an
# operator's instance of another app exits as soon as it starts, on the same
# runners (the runner restarts it with backoff until it gives up: `crashed`).
def latencies(seconds):
    conn = http.client.HTTPConnection(bal_host, int(bal_port), timeout=10)
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        status, _ = get(conn, "bench-first.localhost")
        out.append((time.monotonic() - t) * 1000)
        if status != 200:
            sys.exit(f"bench-first answered {status}")
    out.sort()
    return out


def pct(vals, p):
    return vals[min(len(vals) - 1, int(len(vals) * p))]


def crashy_state():
    ps = json.loads(run(["paddock", "--json", "instance", "ps"], operator).stdout)
    c = [i for i in ps if i["app"] == "crashy"]
    return f"{c[0]['state']}, {c[0]['restarts']} restarts" if c else "not listed"


SECONDS = 15
alone = latencies(SECONDS)
crashy = os.path.join(work, "crashy")
os.makedirs(crashy)
os.chmod(crashy, 0o755)
os.chmod(work, 0o755)
run(["paddock", "instance", "start", "--app", "crashy", "--dir", crashy, "--",
     "python3", "-c", "import sys; sys.exit(1)"], operator)
during = latencies(SECONDS)
state = crashy_state()
print()
print(f"bench-first latency through the balancer, sequential requests for {SECONDS} s each (ms):")
print(f"  alone:                     {len(alone)} requests, p50 {pct(alone, 0.5):.2f}  p99 {pct(alone, 0.99):.2f}")
print(f"  while crashy crash-loops:  {len(during)} requests, p50 {pct(during, 0.5):.2f}  p99 {pct(during, 0.99):.2f}  (crashy at the end: {state})")
