//! Logging: human lines on stderr (JSON with `--log-json`), optionally also to the
//! local syslog socket.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use tracing::Level;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    pub json: bool,
    pub syslog: bool,
    /// Where syslog listens (default /dev/log).
    pub syslog_socket: Option<std::path::PathBuf>,
    /// A filter (`info`, `paddock_locker=debug,info`); `PADDOCK_LOG` overrides it.
    pub level: Option<String>,
}

/// Installs the global subscriber. `ident` names the process in syslog.
pub fn init(ident: &str, opts: &LogOptions) {
    let filter = std::env::var("PADDOCK_LOG")
        .ok()
        .or_else(|| opts.level.clone())
        .unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr_layer = if opts.json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed()
    };
    let syslog_layer = if opts.syslog {
        let path = opts
            .syslog_socket
            .clone()
            .unwrap_or_else(|| "/dev/log".into());
        match Syslog::connect(ident, &path) {
            Ok(s) => Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(s)
                    .with_ansi(false)
                    .without_time()
                    .with_target(false)
                    .boxed(),
            ),
            Err(e) => {
                eprintln!(
                    "warning: syslog requested but {} is not usable: {e}",
                    path.display()
                );
                None
            }
        }
    } else {
        None
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(stderr_layer)
        .with(syslog_layer)
        .try_init();
}

/// Writes each log line as one RFC 3164 datagram to /dev/log, facility `daemon`.
#[derive(Clone)]
struct Syslog {
    sock: Arc<UnixDatagram>,
    ident: Arc<str>,
}

impl Syslog {
    fn connect(ident: &str, path: &std::path::Path) -> std::io::Result<Syslog> {
        let sock = UnixDatagram::unbound()?;
        sock.connect(path)?;
        Ok(Syslog {
            sock: Arc::new(sock),
            ident: ident.into(),
        })
    }
}

struct SyslogLine {
    target: Syslog,
    severity: u8,
    buf: Vec<u8>,
}

impl Write for SyslogLine {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogLine {
    fn drop(&mut self) {
        const DAEMON_FACILITY: u8 = 3;
        let line = String::from_utf8_lossy(&self.buf);
        let msg = format!(
            "<{}>{}[{}]: {}",
            DAEMON_FACILITY * 8 + self.severity,
            self.target.ident,
            std::process::id(),
            line.trim_end()
        );
        let _ = self.target.sock.send(msg.as_bytes());
    }
}

impl<'a> MakeWriter<'a> for Syslog {
    type Writer = SyslogLine;

    fn make_writer(&'a self) -> SyslogLine {
        SyslogLine {
            target: self.clone(),
            severity: 6,
            buf: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> SyslogLine {
        let severity = match *meta.level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            _ => 7,
        };
        SyslogLine {
            target: self.clone(),
            severity,
            buf: Vec::new(),
        }
    }
}
