"""The push benchmark's measuring half (ops/bench/push/run.sh starts the cluster).

Every push is a real `git push` over the gitserver's sshd; its wall time is
measured here, and the build's own step durations are read back with
`paddock builds info --json`. "transfer" is the push's time outside the build
(the deployer's own total): ssh, receive-pack, the tree's upload to the
blobstore, the build lease, the ref update. "slug" includes its upload to the
blobstore pair; "release" is the api's release.create and release.status.
"""
import json, os, shutil, statistics, subprocess, sys, time

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

APPS = {
    "stdlib": {
        "Procfile": "web: python3 server.py\n",
        "server.py": (
            "import http.server, os\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        self.send_response(200); self.end_headers(); self.wfile.write(b'hello')\n"
            "http.server.HTTPServer(('0.0.0.0', int(os.environ['PORT'])), H).serve_forever()\n"
        ),
    },
    "flask": {
        "requirements.txt": "flask==3.0.3\n",
        "Procfile": "wsgi: app:app\n",
        "app.py": (
            "from flask import Flask\napp = Flask(__name__)\n"
            "@app.route('/')\ndef hello():\n    return 'Hello from Paddock'\n"
        ),
    },
}

deployer_cache = os.path.join(dev, "state", "deployer", "cache")
results = {}
for kind, files in APPS.items():
    app = f"bench-{kind}"
    url = json.loads(run(["paddock", "--json", "apps", "create", app], customer).stdout)
    url = url.get("git_url") or url.get("app", {}).get("git_url")
    tree = os.path.join(work, app)
    os.makedirs(tree)
    for name, body in files.items():
        with open(os.path.join(tree, name), "w") as f:
            f.write(body)
    g = lambda *a: run(["git", *a], customer, cwd=tree)
    g("init", "-q", "-b", "main")
    g("config", "user.email", "bench@example.com")
    g("config", "user.name", "bench")
    g("add", "-A")
    g("commit", "-qm", "first")
    g("remote", "add", "paddock", url)
    for phase in ("cold", "warm"):
        rows = []
        for i in range(n):
            if phase == "cold":
                shutil.rmtree(os.path.join(deployer_cache, app), ignore_errors=True)
            g("commit", "-q", "--allow-empty", "-m", f"{phase} {i}")
            t0 = time.monotonic()
            p = run(["git", "push", "-q", "paddock", "main"], customer, cwd=tree, check=False)
            total = (time.monotonic() - t0) * 1000
            if p.returncode != 0:
                sys.exit(f"push of {app} failed:\n{p.stderr}")
            b = json.loads(run(["paddock", "--json", "builds", "-a", app, "-n", "1"], customer).stdout)
            steps = {k: float(v) for k, v in b["builds"][0].get("durations", {}).items()}
            build = steps.pop("total", None) or sum(steps.values())
            row = {"push": total, "build": build, **steps}
            row["transfer"] = total - build
            rows.append(row)
            print(f"{app} {phase} #{i + 1}: {total:.0f} ms", flush=True)
        results[(kind, phase)] = rows

cols = ["push", "transfer", "build", "source", "detect", "compile", "slug", "release"]
print()
print(f"push → release, p50 of {n} pushes each (ms)")
print(f"{'app':<8} {'cache':<5} " + " ".join(f"{c:>9}" for c in cols))
for (kind, phase), rows in results.items():
    cells = []
    for c in cols:
        vals = [r[c] for r in rows if c in r]
        cells.append(f"{statistics.median(vals):9.0f}" if vals else f"{'-':>9}")
    print(f"{kind:<8} {phase:<5} " + " ".join(cells))
print()
print("goals: warm stdlib < 1500 ms, warm flask < 3000 ms")
