//! Output in Heroku's style: `=== Title` headings, `Key: value` blocks and
//! borderless tables. Plain text only: no colours or other escape codes ever, and
//! no rule under table headings when stdout is not a terminal (`| grep`, `| awk`
//! and scripts get one line per row, columns separated by spaces).
//!
//! Text that came from the api (names, descriptions, config values, error
//! messages) may hold control characters: on a terminal they are shown as
//! `\u{1b}` rather than sent to it, so no one can move the cursor, rewrite what
//! was printed or talk to the terminal through the CLI. Piped output is left as
//! it came (`$(paddock config get K)` is the value, byte for byte).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::IsTerminal;

pub fn is_tty() -> bool {
    std::io::stdout().is_terminal()
}

fn stderr_is_tty() -> bool {
    std::io::stderr().is_terminal()
}

/// A character a terminal may act on: C0 controls but tab (and newline when
/// `keep_newline`), DEL, and C1 controls (U+0080–U+009F; U+009B is CSI).
fn is_control(c: char, keep_newline: bool) -> bool {
    match c {
        '\t' => false,
        '\n' => !keep_newline,
        _ => c.is_control(),
    }
}

/// `text` with every control character a terminal would act on written as a
/// visible `\u{1b}`; borrowed when there is none.
pub fn escape(text: &str, keep_newline: bool) -> Cow<'_, str> {
    if !text.chars().any(|c| is_control(c, keep_newline)) {
        return Cow::Borrowed(text);
    }
    let mut s = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_control(c, keep_newline) {
            let _ = write!(s, "\\u{{{:x}}}", c as u32);
        } else {
            s.push(c);
        }
    }
    Cow::Owned(s)
}

/// `text` for stdout: escaped (newlines too) on a terminal, as is when piped.
pub fn term(text: &str) -> Cow<'_, str> {
    if is_tty() {
        escape(text, false)
    } else {
        Cow::Borrowed(text)
    }
}

/// Prints a line (a message that may hold the api's text) on stdout; on a
/// terminal, its control characters but newlines are escaped.
pub fn say(text: &str) {
    if is_tty() {
        println!("{}", escape(text, true));
    } else {
        println!("{text}");
    }
}

/// As `say`, on stderr.
pub fn say_err(text: &str) {
    if stderr_is_tty() {
        eprintln!("{}", escape(text, true));
    } else {
        eprintln!("{text}");
    }
}

/// A value printed bare (`config get`): as is when piped, for scripts; escaped
/// on a terminal, keeping the lines of a multi-line value.
pub fn value(text: &str) {
    say(text);
}

/// serde_json's text with DEL and the C1 controls written as `\u007f`,
/// `\u009b`… too (serde_json escapes only C0): the same JSON value, safe on a
/// terminal.
pub fn safe_json(text: String) -> String {
    if !text.chars().any(|c| c.is_control() && c != '\n') {
        return text;
    }
    // Outside strings serde_json writes only spaces and newlines: any other
    // control character is inside a string, where `\uXXXX` means the same.
    let mut s = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c.is_control() && c != '\n' {
            let _ = write!(s, "\\u{:04x}", c as u32);
        } else {
            s.push(c);
        }
    }
    s
}

/// An instance's log line as `instance logs` prints it: the app's output is
/// escaped on a terminal (an app must not drive the operator's terminal).
pub fn log_line(when: &str, stream: &str, line: &str, tty: bool) -> String {
    if tty {
        format!("{when} {} {}", escape(stream, false), escape(line, false))
    } else {
        format!("{when} {stream} {line}")
    }
}

/// `=== text`
pub fn heading(text: &str) {
    println!("=== {}", term(text));
}

/// A borderless table: columns padded to their widest cell, two spaces apart.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text; on a terminal, a rule under the header and control
    /// characters in cells escaped.
    pub fn render(&self, tty: bool) -> String {
        if tty {
            let esc = |r: &[String]| -> Vec<String> {
                r.iter().map(|c| escape(c, false).into_owned()).collect()
            };
            return Table {
                header: esc(&self.header),
                rows: self.rows.iter().map(|r| esc(r)).collect(),
            }
            .layout(true);
        }
        self.layout(false)
    }

    fn layout(&self, tty: bool) -> String {
        let n = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate().take(n) {
                if i > 0 {
                    s.push_str("  ");
                }
                let _ = write!(s, "{c:<w$}", w = widths[i]);
            }
            s.trim_end().to_string()
        };
        let mut out = line(&self.header);
        out.push('\n');
        if tty {
            let rule: Vec<String> = widths.iter().map(|w| "─".repeat(*w)).collect();
            out.push_str(&line(&rule));
            out.push('\n');
        }
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render(is_tty()));
    }
}

/// `Key: value` lines with the values aligned, as `heroku apps:info` prints them.
pub fn fields(pairs: &[(&str, String)]) {
    print!("{}", render_fields(pairs, is_tty()));
}

/// Config vars as `NAME: value` lines, values aligned.
pub fn vars(map: &serde_json::Map<String, serde_json::Value>) {
    let pairs: Vec<(&str, String)> = map
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    fields(&pairs);
}

fn render_fields(pairs: &[(&str, String)], tty: bool) -> String {
    let show = |t: &str| -> String {
        if tty {
            escape(t, false).into_owned()
        } else {
            t.to_string()
        }
    };
    let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (show(k), show(v))).collect();
    let w = pairs
        .iter()
        .map(|(k, _)| k.chars().count() + 1)
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v) in &pairs {
        let _ = writeln!(out, "{:<w$} {v}", format!("{k}:"));
    }
    out
}

/// Unix epoch milliseconds as `2026-12-06 06:10:29 UTC`.
pub fn time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(time(1_763_900_000_123), "2025-11-23 12:13:20 UTC");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn control_characters_are_escaped() {
        // C0 (ESC, BEL, CR, backspace), DEL and C1 (U+009B is CSI, U+0085 NEL).
        assert_eq!(
            escape(
                "a\x1b]0;pwned\x07b\r\x08\x7f\u{9b}2J\u{85}\u{80}\u{9f}",
                false
            ),
            "a\\u{1b}]0;pwned\\u{7}b\\u{d}\\u{8}\\u{7f}\\u{9b}2J\\u{85}\\u{80}\\u{9f}"
        );
        // Tab stays; newline stays only when asked.
        assert_eq!(escape("a\tb\nc", true), "a\tb\nc");
        assert_eq!(escape("a\tb\nc", false), "a\tb\\u{a}c");
        // Nothing else is touched, and clean text is not copied.
        let clean = "héllo wörld ─ \u{a0}\u{100} \\u{1b} 日本";
        assert!(matches!(escape(clean, false), Cow::Borrowed(s) if s == clean));
        // Escaping twice is escaping once: the escape has no control characters.
        let once = escape("\x1b[31m\u{9b}", false).into_owned();
        assert_eq!(escape(&once, false), once);
    }

    #[test]
    fn tables_and_fields_escape_on_a_terminal_only() {
        let mut t = Table::new(&["NAME", "DESCRIPTION"]);
        t.row(vec!["a\x1b[2J".into(), "x\u{9b}1;1H\ny".into()]);
        assert_eq!(
            t.render(true),
            "NAME        DESCRIPTION\n\
             ──────────  ─────────────────\n\
             a\\u{1b}[2J  x\\u{9b}1;1H\\u{a}y\n"
        );
        assert_eq!(
            t.render(false),
            "NAME   DESCRIPTION\na\x1b[2J  x\u{9b}1;1H\ny\n"
        );
        let f = [
            ("Owner", "eve\x1b[8m".to_string()),
            ("Bell\x07", "x".into()),
        ];
        assert_eq!(
            render_fields(&f, true),
            "Owner:     eve\\u{1b}[8m\nBell\\u{7}: x\n"
        );
        assert_eq!(render_fields(&f, false), "Owner: eve\x1b[8m\nBell\x07: x\n");
    }

    #[test]
    fn app_log_lines_are_escaped_on_a_terminal() {
        let l = "GET / 200 \x1b]52;c;ZXZpbA==\x07\u{9b}6n";
        assert_eq!(
            log_line("12:00:00", "stdout", l, true),
            "12:00:00 stdout GET / 200 \\u{1b}]52;c;ZXZpbA==\\u{7}\\u{9b}6n"
        );
        assert_eq!(
            log_line("12:00:00", "stdout", l, false),
            format!("12:00:00 stdout {l}")
        );
    }

    #[test]
    fn plain_tables_have_no_borders() {
        let mut t = Table::new(&["NAME", "ROLE"]);
        t.row(vec!["myapp".into(), "owner".into()]);
        t.row(vec!["a".into(), "".into()]);
        assert_eq!(t.render(false), "NAME   ROLE\nmyapp  owner\na\n");
        assert_eq!(
            t.render(true),
            "NAME   ROLE\n─────  ─────\nmyapp  owner\na\n"
        );
    }
}
