//! HTML escaping for the pages both binaries render (the agent's status
//! page, the master's dashboard and build pages): the one escaper.

/// Escapes text for HTML element content and quoted attribute values:
/// `& < > " '` become entities, a carriage return becomes a line break (as
/// an HTML parser reads it, so `\r\n` stays one break), and other control
/// characters, which HTML does not allow, are dropped (tab and newline stay).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\r' => out.push('\n'),
            c if c.is_control() && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_and_quotes_become_entities() {
        assert_eq!(
            escape("<a href='x' title=\"y\">&</a>"),
            "&lt;a href=&#39;x&#39; title=&quot;y&quot;&gt;&amp;&lt;/a&gt;"
        );
        assert_eq!(escape("plain text, ünïcode"), "plain text, ünïcode");
    }

    #[test]
    fn line_ends_read_as_a_parser_would_and_control_characters_go() {
        assert_eq!(escape("a\r\nb\rc\nd"), "a\nb\nc\nd");
        assert_eq!(escape("\u{1b}[31mred\u{1b}[0m\tok\u{7}"), "[31mred[0m\tok");
    }
}
