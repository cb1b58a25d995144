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
    // libyaml skips a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
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

/// The walk through the file, line by line.
///
/// It skips text (quoted scalars, comments, block scalars) only where YAML
/// certainly does: skipping a bracket YAML counts would let deep nesting
/// through, while counting a bracket YAML skips only overcounts. Quotes
/// open a quoted scalar only where a node starts (a plain scalar may hold
/// quotes: `don't`, and its continuation lines may start with one).
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
    /// Whether a node may start at the next character: where YAML reads
    /// `[`, `{` and quotes as indicators rather than as text.
    node_start: bool,
}

/// Characters that end an anchor or tag and that YAML may read as a flow
/// collection's indicators.
fn flow_indicator(b: u8) -> bool {
    matches!(b, b'[' | b']' | b'{' | b'}' | b',')
}

fn blank(b: Option<u8>) -> bool {
    b.is_none_or(|b| b == b' ' || b == b'\t')
}

impl Walk {
    fn line(&mut self, number: usize, line: &str) -> Result<(), (usize, usize)> {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|&&b| b == b' ').count();
        let is_blank = bytes[indent..].iter().all(|b| b.is_ascii_whitespace());
        if let Some(parent) = self.block_scalar {
            if is_blank || indent > parent {
                return Ok(());
            }
            self.block_scalar = None;
        }
        let mut start = indent;
        if self.quote.is_none() && self.flow == 0 {
            if is_blank || bytes[indent] == b'#' {
                return Ok(());
            }
            // Directives, and the markers that start and end a document.
            if indent == 0 && bytes[0] == b'%' {
                return Ok(());
            }
            let marker = bytes.starts_with(b"---") || bytes.starts_with(b"...");
            if indent == 0 && marker && blank(bytes.get(3).copied()) {
                self.blocks.clear();
                self.node_start = bytes[0] == b'-';
                return self.scan(number, bytes, 3);
            }
            // A line more indented than its collection, after a line that
            // ended in a plain scalar, continues that scalar.
            let innermost = self.blocks.last().copied();
            let continues = !self.node_start && innermost.is_some_and(|open| indent > open);
            if !continues {
                // A block collection at this indentation: close the deeper
                // ones, open this one unless it continues a sibling.
                while self.blocks.last().is_some_and(|&open| open > indent) {
                    self.blocks.pop();
                }
                if self.blocks.last() != Some(&indent) {
                    self.blocks.push(indent);
                }
                self.too_deep(number, indent)?;
                self.node_start = true;
            }
            start = indent;
        }
        self.scan(number, bytes, start)
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
        while i < bytes.len() {
            if let Some(quote) = self.quote {
                i = self.skip_quoted(quote, bytes, i);
                self.node_start = false;
                continue;
            }
            let b = bytes[i];
            let next = bytes.get(i + 1).copied();
            match b {
                b' ' | b'\t' => {}
                b'#' if i == 0 || matches!(bytes[i - 1], b' ' | b'\t') => return Ok(()),
                b'[' | b'{' if self.node_start || self.flow > 0 => {
                    self.flow += 1;
                    self.too_deep(number, i)?;
                    self.node_start = true;
                }
                b']' | b'}' if self.flow > 0 => {
                    self.flow -= 1;
                    self.node_start = false;
                }
                b',' if self.flow > 0 => self.node_start = true,
                b'"' if self.node_start => {
                    self.quote = Some(Quote::Double);
                    i += 1;
                    continue;
                }
                b'\'' if self.node_start => {
                    self.quote = Some(Quote::Single);
                    i += 1;
                    continue;
                }
                // A block sequence entry nested on the same line (`- - x`)
                // is one level deeper; its content starts after the blanks.
                b'-' if self.node_start && self.flow == 0 && blank(next) => {
                    let content = i + 1 + bytes[i + 1..].iter().take_while(|&&c| c == b' ').count();
                    self.blocks.push(content);
                    self.too_deep(number, i)?;
                }
                // A value or a complex key starts after `:` or `?` and a
                // blank; in a flow collection, also before an indicator
                // (`a:[`). Within a word (`a:b`) it is text.
                b'?' | b':'
                    if blank(next) || (self.flow > 0 && next.is_some_and(flow_indicator)) =>
                {
                    self.node_start = true;
                }
                // Anchors and tags come before a node's content. YAML ends
                // them at a blank or at a flow indicator; stopping at
                // either is never later than YAML does.
                b'&' | b'!' if self.node_start => {
                    while i < bytes.len() && !blank(Some(bytes[i])) && !flow_indicator(bytes[i]) {
                        i += 1;
                    }
                    continue;
                }
                b'|' | b'>' if self.node_start && self.flow == 0 => {
                    // The lines after a block scalar header are its text,
                    // as long as they are indented deeper than the
                    // collection it is in.
                    self.block_scalar = Some(self.blocks.last().copied().unwrap_or(0));
                    self.node_start = true;
                    return Ok(());
                }
                _ => self.node_start = false,
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
    fn no_way_around_the_count() {
        let deep = "[".repeat(40);
        // Found in review: a document marker, a byte-order mark, a colon
        // inside a word before a quote.
        for text in [
            format!("--- {deep}\n"),
            format!("\u{feff}{deep}\n"),
            format!("\u{feff}a: {deep}\n"),
            format!("a: [a:\"x, {deep}]\n"),
            format!("a: [?\"a:\", {deep}]\n"),
            // A quote at the start of a line that continues a plain
            // scalar, in block and in flow context.
            format!("a: b\n  'x\nc: {deep}\n"),
            format!("a: [b,\n  c\n  'x, {deep}]\n"),
            // Anchors and tags end at a flow indicator.
            format!("a: &x{deep}\n"),
            format!("a: !t{deep}\n"),
            format!("a: [&x{deep}]\n"),
            // Text of a block scalar is only what is indented deeper than
            // its collection.
            format!("- a: |\n {deep}\n"),
            format!("%YAML 1.2\n--- {deep}\n"),
        ] {
            assert!(check_depth(&text).is_err(), "{text:?}");
        }
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
