//! The runner's end of a shim's unix socket: a writer that never blocks the actor,
//! the commands queued while no connection is up, and whether a shim process is
//! still alive.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::rc::Rc;

use tokio::io::unix::AsyncFd;

use crate::shim_proto::ShimCommand;

/// Bytes a shim may leave unread before its connection is dropped (it is then
/// reconnected, and its Hello brings the runner up to date).
const MAX_BACKLOG: usize = 1 << 20;

/// Writes command lines on a non-blocking socket from the actor. A line that does
/// not fit in the socket buffer is kept in order in a backlog that a task flushes
/// when the socket is writable again, so the actor never waits.
pub struct Writer {
    fd: Rc<AsyncFd<UnixStream>>,
    backlog: Rc<RefCell<Vec<u8>>>,
    broken: Rc<Cell<bool>>,
}

impl Writer {
    /// `stream` must be non-blocking (it comes from a tokio stream).
    pub fn new(stream: UnixStream) -> std::io::Result<Writer> {
        stream.set_nonblocking(true)?;
        // SAFETY: the stream is owned by the AsyncFd from here on, and nothing
        // else closes its fd while it is registered.
        let fd = unsafe { AsyncFd::register(stream) }?;
        Ok(Writer {
            fd: Rc::new(fd),
            backlog: Rc::new(RefCell::new(Vec::new())),
            broken: Rc::new(Cell::new(false)),
        })
    }

    pub fn send(&self, c: &ShimCommand) -> std::io::Result<()> {
        if self.broken.get() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the shim's connection is broken",
            ));
        }
        let mut line = serde_json::to_vec(c).expect("commands serialize");
        line.push(b'\n');
        let mut backlog = self.backlog.borrow_mut();
        if !backlog.is_empty() {
            // A flush is under way: keep the order.
            if backlog.len() + line.len() > MAX_BACKLOG {
                drop(backlog);
                self.break_off();
                return Err(std::io::Error::other("the shim is not reading its socket"));
            }
            backlog.extend_from_slice(&line);
            return Ok(());
        }
        let n = match self.fd.get_ref().write(&line) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => {
                drop(backlog);
                self.break_off();
                return Err(e);
            }
        };
        if n < line.len() {
            backlog.extend_from_slice(&line[n..]);
            drop(backlog);
            self.flush_later();
        }
        Ok(())
    }

    /// Marks the connection broken and shuts it down, so its reader ends and the
    /// runner reconnects.
    fn break_off(&self) {
        self.broken.set(true);
        self.backlog.borrow_mut().clear();
        let _ = self.fd.get_ref().shutdown(std::net::Shutdown::Both);
    }

    fn flush_later(&self) {
        let (fd, backlog, broken) = (self.fd.clone(), self.backlog.clone(), self.broken.clone());
        actix_rt::spawn(async move {
            loop {
                let Ok(mut ready) = fd.writable().await else {
                    broken.set(true);
                    return;
                };
                let mut b = backlog.borrow_mut();
                if b.is_empty() {
                    return;
                }
                match ready.try_io(|s| s.get_ref().write(&b)) {
                    Ok(Ok(n)) => {
                        b.drain(..n);
                        if b.is_empty() {
                            return;
                        }
                    }
                    Ok(Err(_)) => {
                        broken.set(true);
                        b.clear();
                        let _ = fd.get_ref().shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    Err(_would_block) => {}
                }
            }
        });
    }
}

/// The actor's end of one instance's shim connection.
#[derive(Default)]
pub struct ShimLink {
    writer: Option<Writer>,
    pending: Vec<ShimCommand>,
    /// A `Stop` went out on the current connection (a shim answers each `Stop`
    /// with a `Stopped`, so it is sent once per connection).
    pub stop_sent: bool,
}

impl ShimLink {
    /// Sends at once when connected, else queues until [`ShimLink::connected`].
    pub fn send(&mut self, c: ShimCommand) {
        if let Some(w) = &self.writer {
            if w.send(&c).is_ok() {
                self.stop_sent |= matches!(c, ShimCommand::Stop { .. });
                return;
            }
            self.writer = None;
        }
        self.pending.push(c);
    }

    /// A new connection: what was queued goes out first, in order.
    pub fn connected(&mut self, w: Writer) {
        self.writer = Some(w);
        self.stop_sent = false;
        for c in std::mem::take(&mut self.pending) {
            self.send(c);
        }
    }

    pub fn disconnected(&mut self) {
        self.writer = None;
    }

    pub fn forget_pending(&mut self) {
        self.pending.clear();
    }
}

/// Whether the instance's shim is running: the pid in `shim.pid` must be a live
/// `paddock-shim` serving this very directory (pids are reused after a reboot).
pub fn shim_alive(dir: &Path) -> bool {
    let Some(pid) = std::fs::read_to_string(dir.join("shim.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    else {
        return false;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    !zombie_or_gone(pid)
        && cmdline.contains("paddock-shim")
        && cmdline.contains(&*dir.to_string_lossy())
}

/// Whether process `pid` has ended (reaped, or a zombie waiting to be).
pub fn zombie_or_gone(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn a_full_socket_never_blocks_the_sender_and_keeps_the_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let w = Writer::new(a).unwrap();
        let mut link = ShimLink::default();
        link.connected(w);
        // Far more than a socket buffer holds, with nobody reading yet.
        let n = 20_000;
        let t = std::time::Instant::now();
        for sig in 0..n {
            link.send(ShimCommand::Signal { sig });
        }
        assert!(link.writer.is_some(), "still connected");
        // The reader gets every line, in order, as the backlog drains.
        b.set_nonblocking(false).unwrap();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            let mut got = Vec::new();
            for line in std::io::BufReader::new(b).lines() {
                let c: ShimCommand = serde_json::from_str(&line.unwrap()).unwrap();
                if let ShimCommand::Signal { sig } = c {
                    got.push(sig);
                }
                if got.len() == n as usize {
                    break;
                }
            }
            got
        });
        while !reader.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let got = reader.join().unwrap();
        assert_eq!(got, (0..n).collect::<Vec<_>>());
        // (The sends themselves only queued: the time is not asserted, it is shown.)
        eprintln!("{n} sends took {:?}", t.elapsed());
    }

    #[test]
    fn commands_wait_for_a_connection_and_stop_is_remembered_per_connection() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let mut link = ShimLink::default();
            link.send(ShimCommand::Stop {
                sig: 15,
                grace_ms: 1,
            });
            assert!(!link.stop_sent);
            let (a, b) = UnixStream::pair().unwrap();
            link.connected(Writer::new(a).unwrap());
            assert!(
                link.stop_sent,
                "the queued Stop went out on this connection"
            );
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(&b).read_line(&mut line).unwrap();
            assert!(line.contains("\"stop\""), "{line}");
            let (a2, _b2) = UnixStream::pair().unwrap();
            link.connected(Writer::new(a2).unwrap());
            assert!(!link.stop_sent, "a new connection has carried nothing");
        });
    }
}
