//! paddock-static: the static buildpack's web process. Serves a directory
//! (`--root DIR`, else `root` in /app/static.json, else `public`) on
//! 0.0.0.0:$PORT: GET and HEAD only, `index.html` for directories, content types
//! by extension, nothing outside the root (`..` is refused and a symlink that
//! leads out is not followed). The static buildpack copies this binary into the
//! slug (`/app/.paddock/bin/paddock-static`), so a slug serves on any node.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut root: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--root" => root = args.next().map(PathBuf::from),
            "--help" | "-h" => {
                println!("usage: paddock-static [--root DIR]   (listens on 0.0.0.0:$PORT)");
                return;
            }
            other => {
                eprintln!("paddock-static: unknown argument {other}");
                std::process::exit(64);
            }
        }
    }
    let root = root.unwrap_or_else(default_root);
    let root = match root.canonicalize() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("paddock-static: cannot serve {}: {e}", root.display());
            std::process::exit(66);
        }
    };
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5000);
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("paddock-static: cannot listen on 0.0.0.0:{port}: {e}");
            std::process::exit(69);
        }
    };
    println!(
        "paddock-static: serving {} on 0.0.0.0:{port}",
        root.display()
    );
    for conn in listener.incoming().flatten() {
        let root = root.clone();
        std::thread::spawn(move || {
            let _ = serve(conn, &root);
        });
    }
}

/// `root` from ./static.json when it says one, else `public` (else `.`).
fn default_root() -> PathBuf {
    if let Ok(text) = std::fs::read_to_string("static.json") {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if let Some(r) = v.get("root").and_then(|r| r.as_str()) {
                return PathBuf::from(r);
            }
        }
    }
    if Path::new("public").is_dir() {
        PathBuf::from("public")
    } else {
        PathBuf::from(".")
    }
}

fn serve(conn: TcpStream, root: &Path) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?.take(64 * 1024));
    let mut conn = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut keep_alive = request_line.trim_end().ends_with("HTTP/1.1");
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("connection") {
                    let v = v.trim();
                    if v.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if v.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    }
                }
            }
        }
        reader.get_mut().set_limit(64 * 1024);
        let mut parts = request_line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let head = method == "HEAD";
        if method != "GET" && !head {
            respond(
                &mut conn,
                405,
                "text/plain",
                b"method not allowed\n",
                head,
                keep_alive,
                &[("Allow", "GET, HEAD")],
            )?;
        } else {
            match resolve(root, target) {
                Some(file) => match std::fs::read(&file) {
                    Ok(body) => respond(
                        &mut conn,
                        200,
                        content_type(&file),
                        &body,
                        head,
                        keep_alive,
                        &[],
                    )?,
                    Err(_) => respond(
                        &mut conn,
                        404,
                        "text/plain",
                        b"not found\n",
                        head,
                        keep_alive,
                        &[],
                    )?,
                },
                None => respond(
                    &mut conn,
                    404,
                    "text/plain",
                    b"not found\n",
                    head,
                    keep_alive,
                    &[],
                )?,
            }
        }
        if !keep_alive {
            return Ok(());
        }
    }
}

/// The file a request target names under `root`, or `None` (missing, outside
/// the root, or not a regular file).
fn resolve(root: &Path, target: &str) -> Option<PathBuf> {
    let path = target.split(['?', '#']).next()?;
    if !path.starts_with('/') {
        return None;
    }
    let decoded = percent_decode(path)?;
    let mut p = root.to_path_buf();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => return None,
            s if s.contains('\0') => return None,
            s => p.push(s),
        }
    }
    let mut p = p.canonicalize().ok()?;
    if !p.starts_with(root) {
        return None;
    }
    if p.is_dir() {
        p = p.join("index.html").canonicalize().ok()?;
        if !p.starts_with(root) {
            return None;
        }
    }
    p.is_file().then_some(p)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn content_type(p: &Path) -> &'static str {
    match p
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .as_deref()
    {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        Some("xml") => "application/xml",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("ico") => "image/x-icon",
        Some("woff") => "font/woff",
        Some("woff2") => "font/woff2",
        Some("wasm") => "application/wasm",
        Some("pdf") => "application/pdf",
        _ => "application/octet-stream",
    }
}

fn respond(
    conn: &mut TcpStream,
    status: u16,
    ctype: &str,
    body: &[u8],
    head: bool,
    keep_alive: bool,
    extra: &[(&str, &str)],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let mut h = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: {}\r\n",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    for (k, v) in extra {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    conn.write_all(h.as_bytes())?;
    if !head {
        conn.write_all(body)?;
    }
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_inside_the_root_only() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("public");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("index.html"), "hi").unwrap();
        std::fs::write(root.join("sub/a b.css"), "x").unwrap();
        std::fs::write(t.path().join("secret"), "no").unwrap();
        std::os::unix::fs::symlink(t.path().join("secret"), root.join("leak")).unwrap();
        let root = root.canonicalize().unwrap();
        assert_eq!(resolve(&root, "/").unwrap(), root.join("index.html"));
        assert_eq!(
            resolve(&root, "/sub/a%20b.css?x=1").unwrap(),
            root.join("sub/a b.css")
        );
        assert!(resolve(&root, "/../secret").is_none());
        assert!(resolve(&root, "/%2e%2e/secret").is_none());
        assert!(resolve(&root, "/leak").is_none());
        assert!(resolve(&root, "/sub").is_none());
        assert!(resolve(&root, "/missing").is_none());
        assert_eq!(content_type(Path::new("a.CSS")), "text/css; charset=utf-8");
    }
}
