//! Finds where one JSON value ends without parsing it: only strings (with their escapes) and
//! bracket nesting are tracked. The splitter uses it to step over an element serde refused (too
//! large, a syntax error, bad UTF-8) so that the elements after it still come through.

/// Deeper nesting than this is not followed (serde refuses far less); the extent is then unknown.
const MAX_DEPTH: usize = 1 << 16;

/// What a scan has learnt so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The value goes on past the bytes fed so far.
    More,
    /// The value ends this many bytes into the bytes fed last.
    End(usize),
    /// The bytes cannot be one value (a closing bracket that does not match, nesting too deep,
    /// nothing before a delimiter): where the value ends is unknown. The offending byte is this
    /// many bytes into the bytes fed last.
    Broken(usize),
}

/// Scanner state, kept across refills of the window. Fed the bytes of one value from its first
/// byte on, in order, in any pieces.
#[derive(Debug, Default)]
pub struct Extent {
    /// Open brackets, innermost last.
    open: Vec<u8>,
    in_string: bool,
    escaped: bool,
    /// A bare scalar (number, literal, or junk) at the top: it ends at the next delimiter.
    scalar: bool,
    /// Whether the first byte was seen.
    started: bool,
}

impl Extent {
    /// Feeds the next bytes of the value.
    pub fn feed(&mut self, bytes: &[u8]) -> Step {
        let mut i = 0;
        while i < bytes.len() {
            if self.in_string {
                if self.escaped {
                    // The byte right after a backslash is escaped, whatever it is.
                    self.escaped = false;
                    i += 1;
                    continue;
                }
                // Jump to the next quote or backslash: strings are most of an event's bytes.
                let rest = bytes.get(i..).unwrap_or_default();
                let Some(at) = memchr::memchr2(b'"', b'\\', rest) else {
                    break;
                };
                let j = i + at;
                i = j + 1;
                if bytes.get(j) == Some(&b'\\') {
                    self.escaped = true;
                    continue;
                }
                self.in_string = false;
                if self.open.is_empty() {
                    return Step::End(i);
                }
                continue;
            }
            let b = bytes.get(i).copied().unwrap_or_default();
            if !self.started {
                self.started = true;
                match b {
                    b'{' | b'[' => self.open.push(b),
                    b'"' => self.in_string = true,
                    b',' | b']' | b'}' | b' ' | b'\n' | b'\r' | b'\t' => return Step::Broken(i),
                    _ => self.scalar = true,
                }
                i += 1;
                continue;
            }
            if self.scalar {
                if matches!(b, b',' | b']' | b'}' | b' ' | b'\n' | b'\r' | b'\t') {
                    return Step::End(i);
                }
                i += 1;
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    if self.open.len() >= MAX_DEPTH {
                        return Step::Broken(i);
                    }
                    self.open.push(b);
                }
                b'}' | b']' => {
                    let opener = if b == b'}' { b'{' } else { b'[' };
                    if self.open.pop() != Some(opener) {
                        return Step::Broken(i);
                    }
                    if self.open.is_empty() {
                        return Step::End(i + 1);
                    }
                }
                _ => {}
            }
            i += 1;
        }
        Step::More
    }

    /// The input ended: a bare scalar ends with it, anything else is cut off.
    pub fn ends_at_eof(&self) -> bool {
        self.scalar
    }
}

/// The extent of the value at the start of `bytes`, when it is all there.
#[cfg(test)]
pub fn extent_of(bytes: &[u8]) -> Option<usize> {
    match Extent::default().feed(bytes) {
        Step::End(n) => Some(n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_end_of_objects_arrays_strings_and_scalars() {
        assert_eq!(extent_of(br#"{"a":"}\"]"}, {"b":1}"#), Some(12));
        assert_eq!(extent_of(br#"{"a":tru}, x"#), Some(9));
        assert_eq!(extent_of(br#"[1,[2,{}]],"#), Some(10));
        assert_eq!(extent_of(br#""a\\",1"#), Some(5));
        assert_eq!(extent_of(b"12345]"), Some(5));
        assert_eq!(extent_of(b"nul ,"), Some(3));
        assert_eq!(extent_of(br#"{"a":[}"#), None);
        assert_eq!(extent_of(b"]"), None);
        assert_eq!(extent_of(br#"{"a":"open"#), None);
    }

    #[test]
    fn any_split_of_the_input_finds_the_same_end() {
        let input = br#"{"x":"a\\\"b}\\","y":[{"z":"]]"}],"w":"\u00e9"} ,{"#;
        let whole = extent_of(input).unwrap();
        for cut in 0..input.len() {
            let mut e = Extent::default();
            let got = match e.feed(&input[..cut]) {
                Step::End(n) => n,
                Step::More => match e.feed(&input[cut..]) {
                    Step::End(n) => cut + n,
                    s => panic!("cut {cut}: {s:?}"),
                },
                s => panic!("cut {cut}: {s:?}"),
            };
            assert_eq!(got, whole, "cut {cut}");
        }
    }
}
