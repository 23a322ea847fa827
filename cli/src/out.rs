//! Output in Heroku's style: `=== Title` headings, `Key: value` blocks and
//! borderless tables. Plain text only: no colours or other escape codes ever, and
//! no rule under table headings when stdout is not a terminal (`| grep`, `| awk`
//! and scripts get one line per row, columns separated by spaces).

use std::fmt::Write as _;
use std::io::IsTerminal;

pub fn is_tty() -> bool {
    std::io::stdout().is_terminal()
}

/// `=== text`
pub fn heading(text: &str) {
    println!("=== {text}");
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

    /// The table as text; a rule under the header only on a terminal.
    pub fn render(&self, tty: bool) -> String {
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
    let w = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    for (k, v) in pairs {
        println!("{:<w$} {v}", format!("{k}:"));
    }
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
