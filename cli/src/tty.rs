//! A one-off command's terminal, shared by the operator's `paddock instance run`
//! (straight to a runner) and the customer's `paddock run` (through the api):
//! both speak `run.input`, `run.resize` and `run.output` with the same bodies.
//! The local terminal goes raw for a PTY; a thread sends stdin, another the
//! window size when it changes; the output is long-polled and written as it
//! comes; the remote command's exit status is returned.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use anyhow::Result;
use base64::Engine;
use nix::sys::termios::Termios;
use serde_json::{json, Value};

/// A connection that can send the `run.*` kinds (to a runner or to the api).
pub trait RunConn: Send {
    fn call(&mut self, kind: &str, body: Value) -> Result<Value>;
}

/// Makes another connection, for a thread of its own (a connection is not
/// shared between threads).
pub type Connect = Box<dyn Fn() -> Result<Box<dyn RunConn>> + Send + Sync>;

/// How long each `run.output` waits for output on the far side.
pub const OUTPUT_WAIT_MS: u64 = 2000;

/// The wire form of a command given as words: a single word is a command line
/// (`command`, run by `sh -c` when it has shell syntax), several are an
/// argument list (`argv`), passed unchanged.
pub fn command_fields(words: &[String]) -> (String, Option<Vec<String>>) {
    match words {
        [line] => (line.clone(), None),
        _ => (String::new(), Some(words.to_vec())),
    }
}

/// Puts a terminal in raw mode; restores it when dropped.
pub struct Raw {
    saved: Option<Termios>,
}

impl Raw {
    pub fn enter() -> Raw {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !std::io::IsTerminal::is_terminal(&stdin) {
            return Raw { saved: None };
        }
        match tcgetattr(&stdin) {
            Ok(t) => {
                let mut raw = t.clone();
                cfmakeraw(&mut raw);
                let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
                Raw { saved: Some(t) }
            }
            Err(_) => Raw { saved: None },
        }
    }

    /// Whether a terminal was put in raw mode (stdin is one).
    pub fn is_raw(&self) -> bool {
        self.saved.is_some()
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                t,
            );
        }
    }
}

/// The local terminal's (columns, rows); 80×24 when stdout is not one.
pub fn term_size() -> (u16, u16) {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills a winsize we own.
    let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 {
        (ws.ws_col, ws.ws_row)
    } else {
        (80, 24)
    }
}

/// The signal that asked this process to stop (0: none yet).
static STOP: AtomicI32 = AtomicI32::new(0);

/// From now on SIGINT, SIGTERM and SIGHUP (Ctrl-C without a raw terminal, a
/// closed terminal, a killed script) are noted instead of ending the process,
/// so that [`attach`] can kill the run first; a signal that comes before the
/// run's id is known kills the run once it is.
///
/// Call it first, before any connection is made: the signals are blocked in
/// this thread, so in every thread started after (libzmq's included), and one
/// thread of its own waits for them. So no call is ever interrupted (libzmq
/// gives up a call on EINTR, and `run.start` cannot be sent again: it would
/// start a second run).
pub fn catch_stop() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(sig);
    }
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            STOP.store(sig as i32, Ordering::SeqCst);
        }
    });
}

/// Once a stop was noted: the run is killed too, the terminal restored, and
/// the process exits with 128 + the signal. Without this the command would run
/// on, unattached, until the api gives up on it.
fn kill_on_stop(connect: std::sync::Arc<Connect>, id: String, saved: Option<Termios>) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(100));
        let sig = STOP.load(Ordering::SeqCst);
        if sig == 0 {
            continue;
        }
        if let Ok(mut c) = connect() {
            let _ = c.call("run.kill", json!({ "id": id }));
        }
        if let Some(t) = &saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                t,
            );
        }
        eprintln!("\r\n(interrupted: the command was killed)");
        std::process::exit(128 + sig);
    });
}

/// Attaches to run `id` until its command ends; returns its exit status (128 +
/// signal when it was killed). With `pty`, the terminal is raw meanwhile, stdin
/// goes to the run (end of input on a pipe becomes ^D) and window size changes
/// follow; without, stdin is not read. A signal to stop this process (see
/// [`catch_stop`], which the caller calls first) kills the run. `main` polls the output: its timeout must exceed [`OUTPUT_WAIT_MS`].
pub fn attach(mut main: Box<dyn RunConn>, id: &str, pty: bool, connect: Connect) -> Result<i32> {
    let connect = std::sync::Arc::new(connect);
    let raw = pty.then(Raw::enter);
    kill_on_stop(
        connect.clone(),
        id.to_string(),
        raw.as_ref().and_then(|r| r.saved.clone()),
    );
    let b64 = &base64::engine::general_purpose::STANDARD;
    if pty {
        let (connect, id) = (connect.clone(), id.to_string());
        std::thread::spawn(move || {
            let Ok(mut c) = connect() else {
                return;
            };
            let mut buf = [0u8; 4096];
            let mut stdin = std::io::stdin();
            loop {
                let data: Vec<u8> = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => vec![4],
                    Ok(n) => buf[..n].to_vec(),
                };
                let eof = data == [4];
                let sent = c.call("run.input", json!({"id": id, "data": b64.encode(&data)}));
                if sent.is_err() || eof {
                    return;
                }
            }
        });
    }
    if raw.as_ref().is_some_and(Raw::is_raw) {
        let (connect, id) = (connect.clone(), id.to_string());
        std::thread::spawn(move || {
            let Ok(mut c) = connect() else {
                return;
            };
            let mut last = term_size();
            loop {
                std::thread::sleep(Duration::from_millis(250));
                let now = term_size();
                if now != last {
                    last = now;
                    let _ = c.call(
                        "run.resize",
                        json!({"id": id, "cols": now.0, "rows": now.1}),
                    );
                }
            }
        });
    }
    let mut offset = 0u64;
    let mut out = std::io::stdout();
    loop {
        let r = main.call(
            "run.output",
            json!({"id": id, "offset": offset, "wait_ms": OUTPUT_WAIT_MS}),
        );
        // Stopping (the kill may have ended the run): the watcher kills the run
        // and exits with the signal's status.
        if STOP.load(Ordering::SeqCst) != 0 {
            loop {
                std::thread::park();
            }
        }
        let v = r?;
        let data = b64
            .decode(v["data"].as_str().unwrap_or(""))
            .unwrap_or_default();
        out.write_all(&data)?;
        out.flush()?;
        offset = v["next_offset"].as_u64().unwrap_or(offset);
        if v["done"] == true {
            drop(raw);
            return Ok(v["exit_code"].as_i64().unwrap_or(1) as i32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_word_is_a_command_line_and_several_are_an_argv() {
        assert_eq!(
            command_fields(&["echo $HOME; ls".into()]),
            ("echo $HOME; ls".into(), None)
        );
        let words: Vec<String> = vec!["python3".into(), "-c".into(), "print(1)".into()];
        assert_eq!(command_fields(&words), (String::new(), Some(words.clone())));
    }
}
