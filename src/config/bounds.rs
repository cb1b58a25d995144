//! Bounds on the work a configuration file can cause, checked before the
//! YAML parser sees it.
//!
//! libyaml's scanner does work proportional to the flow nesting depth for
//! every token (it keeps a "simple key" per open `[` or `{`), so a file of
//! deeply nested brackets costs time quadratic in its depth: 200 KB of `[`
//! kept sluice busy for a minute, during a reload as much as in `--check`.
//! A real configuration nests five or six levels. So a file larger than
//! [`MAX_FILE_BYTES`] is refused outright, and [`check_depth`] walks the
//! text once, in linear time, with just enough of YAML's rules to count how
//! deep its collections nest, and points at the first place that goes
//! deeper than [`MAX_DEPTH`].
//!
//! The walk may overcount (a plain scalar continued on a line that starts
//! with `[`), never undercount in a way that lets deep nesting through:
//! every bracket that YAML would read as a flow collection is counted.

/// Largest configuration file read: a thousand backends take about 60 KB.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Deepest nesting of mappings and sequences accepted. sluice's own schema
/// needs six.
pub const MAX_DEPTH: usize = 32;

/// Where the text first nests deeper than `MAX_DEPTH`: the 1-based (line,
/// column) of the collection that goes too deep.
pub fn check_depth(text: &str) -> Result<(), (usize, usize)> {
    let mut walk = Walk::default();
    for (index, line) in lines(text).enumerate() {
        walk.line(index + 1, line)?;
    }
    Ok(())
}

/// The lines of `text` as YAML counts them: CRLF, CR and LF all end a line
/// (`str::lines` does not split at a lone CR), so that positions agree with
/// the parser's.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.find(['\r', '\n']) {
            Some(end) => {
                let next = if current[end..].starts_with("\r\n") {
                    end + 2
                } else {
                    end + 1
                };
                rest = Some(&current[next..]).filter(|r| !r.is_empty());
                Some(&current[..end])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

/// What a quoted scalar spanning several lines waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quote {
    Single,
    Double,
}

#[derive(Default)]
struct Walk {
    /// Indentation of each open block collection, innermost last.
    blocks: Vec<usize>,
    /// Open `[` and `{`.
    flow: usize,
    /// Inside a quoted scalar that continues on the next line.
    quote: Option<Quote>,
    /// Inside a block scalar (`|` or `>`): its lines are text while they
    /// are indented deeper than this.
    block_scalar: Option<usize>,
}

impl Walk {
    fn line(&mut self, number: usize, line: &str) -> Result<(), (usize, usize)> {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|&&b| b == b' ').count();
        let blank = bytes[indent..].iter().all(|b| b.is_ascii_whitespace());
        if let Some(parent) = self.block_scalar {
            if blank || indent > parent {
                return Ok(());
            }
            self.block_scalar = None;
        }
        if self.quote.is_none() && self.flow == 0 {
            if blank || bytes[indent] == b'#' {
                return Ok(());
            }
            // A block collection at this indentation: close the deeper
            // ones, open this one unless it continues a sibling.
            while self.blocks.last().is_some_and(|&open| open > indent) {
                self.blocks.pop();
            }
            if self.blocks.last() != Some(&indent) {
                self.blocks.push(indent);
            }
            self.too_deep(number, indent)?;
        }
        self.scan(number, bytes, indent)
    }

    fn too_deep(&self, line: usize, index: usize) -> Result<(), (usize, usize)> {
        if self.blocks.len() + self.flow > MAX_DEPTH {
            Err((line, index + 1))
        } else {
            Ok(())
        }
    }

    /// Walks one line from `start`, counting flow collections and block
    /// sequence entries, skipping quoted text and comments.
    fn scan(&mut self, number: usize, bytes: &[u8], start: usize) -> Result<(), (usize, usize)> {
        let mut i = start;
        // Whether a node may start here: where YAML reads `[`, `{` and
        // quotes as indicators rather than as text of a plain scalar.
        let mut node_start = self.quote.is_none();
        while i < bytes.len() {
            if let Some(quote) = self.quote {
                i = self.skip_quoted(quote, bytes, i);
                node_start = false;
                continue;
            }
            let b = bytes[i];
            let next = bytes.get(i + 1).copied();
            let next_is_blank = next.is_none_or(|n| n == b' ' || n == b'\t');
            match b {
                b' ' | b'\t' => {}
                b'#' if i == 0 || matches!(bytes[i - 1], b' ' | b'\t') => return Ok(()),
                b'[' | b'{' if node_start || self.flow > 0 => {
                    self.flow += 1;
                    self.too_deep(number, i)?;
                    node_start = true;
                }
                b']' | b'}' if self.flow > 0 => {
                    self.flow -= 1;
                    node_start = false;
                }
                b',' if self.flow > 0 => node_start = true,
                b'"' if node_start => {
                    self.quote = Some(Quote::Double);
                    i += 1;
                    continue;
                }
                b'\'' if node_start => {
                    self.quote = Some(Quote::Single);
                    i += 1;
                    continue;
                }
                // A block sequence entry nested on the same line (`- - x`)
                // is one level deeper.
                b'-' if node_start && self.flow == 0 && next_is_blank => {
                    self.blocks.push(i + 1);
                    self.too_deep(number, i)?;
                }
                b'?' | b':' if next_is_blank || (self.flow > 0 && b == b':') => {
                    node_start = true;
                }
                // Anchors and tags come before a node's content.
                b'&' | b'!' if node_start => {
                    while i < bytes.len() && !matches!(bytes[i], b' ' | b'\t') {
                        i += 1;
                    }
                    continue;
                }
                b'|' | b'>' if node_start && self.flow == 0 => {
                    // The lines after a block scalar header are its text.
                    self.block_scalar = Some(bytes.iter().take_while(|&&c| c == b' ').count());
                    return Ok(());
                }
                _ => node_start = false,
            }
            i += 1;
        }
        Ok(())
    }

    /// Skips quoted text from `i`; returns where scanning goes on, past the
    /// closing quote or at the end of the line.
    fn skip_quoted(&mut self, quote: Quote, bytes: &[u8], mut i: usize) -> usize {
        while i < bytes.len() {
            match (quote, bytes[i]) {
                (Quote::Double, b'\\') => i += 2,
                (Quote::Double, b'"') => {
                    self.quote = None;
                    return i + 1;
                }
                (Quote::Single, b'\'') if bytes.get(i + 1) == Some(&b'\'') => i += 2,
                (Quote::Single, b'\'') => {
                    self.quote = None;
                    return i + 1;
                }
                _ => i += 1,
            }
        }
        bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested_brackets(depth: usize) -> String {
        format!("listeners: {}{}\n", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn the_reference_configuration_is_well_within_bounds() {
        let text = include_str!("../../conf/sluice.yaml");
        assert_eq!(check_depth(text), Ok(()));
        let demo = include_str!("../../conf/demo.yaml");
        assert_eq!(check_depth(demo), Ok(()));
    }

    #[test]
    fn deep_flow_collections_are_found_where_they_go_too_deep() {
        assert_eq!(check_depth(&nested_brackets(MAX_DEPTH - 1)), Ok(()));
        // `listeners:` is one level; the 32nd bracket is the 33rd.
        assert_eq!(
            check_depth(&nested_brackets(MAX_DEPTH)),
            Err((1, 12 + MAX_DEPTH - 1))
        );
        let braces = format!("a: {}1{}", "{b: ".repeat(40), "}".repeat(40));
        assert_eq!(check_depth(&braces), Err((1, 4 + 4 * (MAX_DEPTH - 1))));
    }

    #[test]
    fn deep_block_collections_are_found() {
        let mut text = String::new();
        for level in 0..40 {
            text.push_str(&format!("{}k{level}:\n", " ".repeat(level)));
        }
        assert_eq!(check_depth(&text), Err((MAX_DEPTH + 1, MAX_DEPTH + 1)));
        let dashes = format!("a:\n  {}x\n", "- ".repeat(40));
        assert!(check_depth(&dashes).is_err());
        let shallow = format!("a:\n  {}x\n", "- ".repeat(10));
        assert_eq!(check_depth(&shallow), Ok(()));
    }

    #[test]
    fn brackets_in_text_are_not_nesting() {
        let brackets = "[".repeat(100);
        for text in [
            format!("send: \"{brackets}\"\n"),
            format!("send: '{brackets}'\n"),
            format!("send: \"\\\"{brackets}\"\n"),
            format!("send: 'it''s {brackets}'\n"),
            format!("send: x{brackets}\n"),
            format!("send: x # {brackets}\n"),
            format!("# {brackets}\nsend: x\n"),
            format!("send: |\n  {brackets}\n  {brackets}\nnext: 1\n"),
            format!("send: >-\n  {brackets}\n\n  {brackets}\nnext: 1\n"),
            format!("send: \"multi\n  line {brackets}\n  end\"\nnext: 1\n"),
            format!("send: &anchor !!str x{brackets}\n"),
        ] {
            assert_eq!(check_depth(&text), Ok(()), "{text}");
        }
    }

    #[test]
    fn lines_end_as_yaml_ends_them() {
        let text = "a\r\nb\rc\nd";
        assert_eq!(lines(text).collect::<Vec<_>>(), ["a", "b", "c", "d"]);
        assert_eq!(lines("a\n").collect::<Vec<_>>(), ["a"]);
        let deep: String = (0..40)
            .map(|i| format!("{}k{i}:\r", " ".repeat(i)))
            .collect();
        assert_eq!(check_depth(&deep), Err((MAX_DEPTH + 1, MAX_DEPTH + 1)));
    }

    #[test]
    fn quotes_inside_plain_text_do_not_hide_brackets() {
        // `don't` is plain text; the brackets after it on the next line are
        // real flow collections.
        let text = format!("a: don't\nb: {}\n", "[".repeat(40));
        assert!(check_depth(&text).is_err());
        // Neither do quotes inside a flow collection.
        let text = format!("a: [x'y, {}]\n", "[".repeat(40));
        assert!(check_depth(&text).is_err());
    }
}
