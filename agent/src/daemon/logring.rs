//! The last lines the agent logged, kept in memory so the console can show
//! them (`allod console` reads them through the admin socket). Everything is
//! still written to stderr; nothing grows on disk.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;

const KEPT_LINES: usize = 200;

/// Whole lines, and the start of a line not yet ended.
static RING: Mutex<(VecDeque<String>, String)> = Mutex::new((VecDeque::new(), String::new()));

/// The newest `n` lines, oldest first.
pub fn tail(n: usize) -> Vec<String> {
    let ring = RING.lock().expect("log ring");
    let lines = &ring.0;
    lines
        .iter()
        .skip(lines.len().saturating_sub(n))
        .cloned()
        .collect()
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip to the end of the escape sequence (a letter).
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A log writer: stderr, and a copy of each line into the ring.
pub struct Tee;

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        {
            let mut ring = RING.lock().expect("log ring");
            let (lines, partial) = &mut *ring;
            partial.push_str(&String::from_utf8_lossy(buf));
            while let Some(end) = partial.find('\n') {
                let line = strip_ansi(&partial[..end]);
                partial.drain(..=end);
                if line.trim().is_empty() {
                    continue;
                }
                if lines.len() == KEPT_LINES {
                    lines.pop_front();
                }
                lines.push_back(line);
            }
        }
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_lines_without_colours() {
        let mut tee = Tee;
        for i in 0..(KEPT_LINES + 5) {
            writeln!(tee, "\u{1b}[32m INFO\u{1b}[0m line {i}").unwrap();
        }
        let last = tail(2);
        assert_eq!(
            last,
            [
                format!(" INFO line {}", KEPT_LINES + 3),
                format!(" INFO line {}", KEPT_LINES + 4)
            ]
        );
        assert_eq!(tail(10_000).len(), KEPT_LINES);
    }
}
