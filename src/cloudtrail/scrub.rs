//! Masks the values of sensitive keys in raw bytes before they go to the error output.
//!
//! The split stage writes bytes that no transform saw (the first KiB of an oversized event, a
//! malformed element, the raw rest of a file), so `redact` cannot protect them. This works on
//! tokens, not on parsed JSON, so it also works on malformed, cut-off and non-UTF-8 input: every
//! span between two consecutive quotes is a candidate key (whatever the string state, which
//! cannot be known in a piece that starts mid-file); when one names a sensitive key, the value
//! after it (past whitespace and a `:`) is replaced by [`MARKER`]: a string to its closing
//! quote, an object or array to its matching bracket, a scalar to the next delimiter, or
//! everything to the end of the bytes when the value does not end there.

/// What replaces a masked value: a JSON string, so valid JSON stays valid.
pub const MARKER: &[u8] = b"\"[redacted]\"";

/// Keys compared case-insensitively, longer ones are never sensitive.
const KEY_MAX: usize = 64;

/// The most raw bytes collected for one candidate key: room for every character of the
/// longest key written as an escape (`\u0054`), or as one inside an embedded string
/// (`\\u0054`).
const CANDIDATE_MAX: usize = KEY_MAX * 8;

/// Deeper levels of JSON inside strings are not told apart (it is JSON in a string in a string
/// … six deep).
const ESC_LEVELS: u32 = 6;

/// The keys whose values are masked by default (`errors.redact_keys`): credentials CloudTrail
/// records carry (STS and IAM responses, console and database passwords, Secrets Manager and
/// KMS material) and the names redact configurations mask.
pub const DEFAULT_KEYS: &[&str] = &[
    "sessionToken",
    "secretAccessKey",
    "secretKey",
    "password",
    "passwd",
    "newPassword",
    "oldPassword",
    "currentPassword",
    "previousPassword",
    "masterUserPassword",
    "privateKey",
    "privateKeyMaterial",
    "keyMaterial",
    "plaintext",
    "secretString",
    "secretBinary",
    "clientSecret",
    "accessToken",
    "refreshToken",
    "idToken",
    "authorization",
    "apiKey",
    "credentials",
];

/// The sensitive key names, lowercased.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys(Vec<Vec<u8>>);

impl Keys {
    pub fn new<S: AsRef<str>>(names: &[S]) -> Keys {
        Keys(
            names
                .iter()
                .map(|n| n.as_ref().to_ascii_lowercase().into_bytes())
                .filter(|n| !n.is_empty() && n.len() <= KEY_MAX)
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn contains(&self, lowered: &[u8]) -> bool {
        self.0.iter().any(|k| k.as_slice() == lowered)
    }
}

/// Where the scrubber is. Kept between pieces, so a value cut by a piece boundary stays masked.
/// `esc`: the backslashes before each quote at the key's level: 0 for plain JSON, 1 when the key
/// was itself inside a JSON string (`\"password\":\"…\"`, as a message that embeds JSON carries
/// it), 3 inside a string inside that, and so on (`2^level - 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Text,
    /// After a sensitive key: whitespace and one `:` pass, the next token is the value.
    AfterKey {
        colon: bool,
        esc: usize,
    },
    /// Inside a masked string value.
    Str {
        esc: usize,
    },
    /// Inside a masked object or array value.
    Nested {
        depth: u32,
        in_str: bool,
        esc: usize,
    },
    /// Inside a masked bare scalar.
    Scalar {
        esc: usize,
    },
}

/// A scrubber over one stream of bytes, fed in pieces.
#[derive(Debug)]
pub struct Scrubber<'k> {
    keys: &'k Keys,
    state: State,
    /// The lowercased bytes since the last quote, while they could still be a key.
    candidate: Vec<u8>,
    /// Whether a quote was seen and `candidate` is being collected.
    collecting: bool,
    /// Backslashes right before the current byte.
    backslashes: usize,
}

impl<'k> Scrubber<'k> {
    pub fn new(keys: &'k Keys) -> Scrubber<'k> {
        Scrubber {
            keys,
            state: State::Text,
            candidate: Vec::new(),
            collecting: false,
            backslashes: 0,
        }
    }

    /// Scrubs one stream that is all here.
    pub fn scrub<'a>(keys: &Keys, bytes: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        if keys.is_empty() {
            return bytes.into();
        }
        let out = Scrubber::new(keys).feed(bytes);
        if out == bytes {
            bytes.into()
        } else {
            out.into()
        }
    }

    /// Scrubs the next piece of the stream.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len());
        if self.keys.is_empty() {
            out.extend_from_slice(bytes);
            return out;
        }
        for &b in bytes {
            self.step(b, &mut out);
            self.backslashes = if b == b'\\' { self.backslashes + 1 } else { 0 };
        }
        out
    }

    /// Whether a quote here closes a string of the level `esc` names: a plain quote, or an
    /// escaped one (`\"`) inside a string, but not an escaped quote within that (`\\\"`).
    /// At any level, the escapes of deeper ones leave a different remainder.
    fn closes(&self, esc: usize) -> bool {
        self.backslashes % (2 * esc + 2) == esc
    }

    /// Writes the marker in place of a value; inside a string its quotes are escaped.
    /// `quoted`: the value is a string, whose opening backslash is already written.
    fn marker(esc: usize, quoted: bool, out: &mut Vec<u8>) {
        if esc == 0 {
            out.extend_from_slice(MARKER);
            return;
        }
        let quote = |out: &mut Vec<u8>| {
            out.extend(std::iter::repeat_n(b'\\', esc));
            out.push(b'"');
        };
        match quoted {
            true => out.push(b'"'),
            false => quote(out),
        }
        out.extend_from_slice(b"[redacted]");
        quote(out);
    }

    fn step(&mut self, b: u8, out: &mut Vec<u8>) {
        match self.state {
            State::Text => self.text(b, out),
            State::AfterKey { colon, esc } => match b {
                b' ' | b'\n' | b'\r' | b'\t' => out.push(b),
                // An escape before the value's quote, or an escaped newline between.
                b'\\' | b'n' | b'r' | b't'
                    if esc > 0 && (b == b'\\' || self.backslashes % 2 == 1) =>
                {
                    out.push(b)
                }
                b':' if !colon => {
                    out.push(b);
                    self.state = State::AfterKey { colon: true, esc };
                }
                b'"' if self.closes(esc) => {
                    Self::marker(esc, true, out);
                    self.state = State::Str { esc };
                }
                b'{' | b'[' => {
                    Self::marker(esc, false, out);
                    self.state = State::Nested {
                        depth: 1,
                        in_str: false,
                        esc,
                    };
                }
                b',' | b'}' | b']' | b':' | b'"' => {
                    self.state = State::Text;
                    self.text(b, out);
                }
                _ => {
                    Self::marker(esc, false, out);
                    self.state = State::Scalar { esc };
                }
            },
            State::Str { esc } => {
                if b == b'"' && self.closes(esc) {
                    // The closing quote (written with the marker) also opens a candidate.
                    self.resume(true);
                }
            }
            State::Nested { depth, in_str, esc } => {
                let (mut depth, mut in_str) = (depth, in_str);
                if b == b'"' && self.closes(esc) {
                    in_str = !in_str;
                } else if !in_str {
                    match b {
                        b'{' | b'[' => depth = depth.saturating_add(1),
                        b'}' | b']' => depth -= 1,
                        _ => {}
                    }
                }
                self.state = if depth == 0 {
                    self.collecting = false;
                    State::Text
                } else {
                    State::Nested { depth, in_str, esc }
                };
            }
            State::Scalar { esc } => {
                let ends = matches!(b, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t' | b'"')
                    || (esc > 0 && b == b'\\');
                if ends {
                    self.resume(false);
                    self.text(b, out);
                }
            }
        }
    }

    /// Back to plain text after a masked value.
    fn resume(&mut self, at_quote: bool) {
        self.state = State::Text;
        self.collecting = at_quote;
        self.candidate.clear();
    }

    fn text(&mut self, b: u8, out: &mut Vec<u8>) {
        out.push(b);
        if b == b'"' {
            // An escaped key (`\"password\"`) ends in the backslash of its closing quote.
            let name = match self.candidate.iter().rposition(|&c| c != b'\\') {
                Some(last) => self.candidate.get(..=last).unwrap_or_default(),
                None => &[],
            };
            let sensitive = self.collecting && self.keys.contains(&unescape(name));
            self.candidate.clear();
            if sensitive {
                self.collecting = false;
                // The level is the count of trailing one bits: `\"` is level 1, `\\\"`
                // level 2, and `\\\\\"` (an escaped backslash, then `\"`) level 1 again.
                let level = self.backslashes.trailing_ones().min(ESC_LEVELS);
                let esc = (1usize << level) - 1;
                self.state = State::AfterKey { colon: false, esc };
            } else {
                self.collecting = true;
            }
            return;
        }
        if self.collecting {
            if self.candidate.len() < CANDIDATE_MAX {
                self.candidate.push(b.to_ascii_lowercase());
            } else {
                // Too long to be a key: wait for the next quote.
                self.collecting = false;
                self.candidate.clear();
            }
        }
    }
}

/// A candidate key as a reader sees it: JSON escapes decoded (`session\u0054oken` is
/// `sessiontoken`), again while any are left, since a key inside an embedded string is escaped
/// twice; lowercased. Decoding more than the key's level did only ever masks more.
fn unescape(lowered: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let mut name = std::borrow::Cow::Borrowed(lowered);
    // Each round takes off one level of escapes.
    for _ in 0..=ESC_LEVELS {
        if !name.contains(&b'\\') {
            break;
        }
        let decoded = unescape_once(&name);
        name = std::borrow::Cow::Owned(decoded);
    }
    name
}

/// One level of JSON string escapes, lowercased; an escape that is not one stays as it is.
fn unescape_once(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        i += 1;
        if b != b'\\' {
            out.push(b.to_ascii_lowercase());
            continue;
        }
        match bytes.get(i) {
            Some(b'u') => {
                // `\uXXXX`: four hex digits (bounds checked by `get`).
                let code = bytes
                    .get(i + 1..i + 5)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u32::from_str_radix(h, 16).ok());
                match code.and_then(char::from_u32) {
                    Some(c) => {
                        let mut utf8 = [0u8; 4];
                        let c = c.to_ascii_lowercase();
                        out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
                        i += 5;
                    }
                    None => out.push(b),
                }
            }
            Some(&e @ (b'\\' | b'/' | b'"')) => {
                out.push(e);
                i += 1;
            }
            _ => out.push(b),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrub(input: &str) -> String {
        let keys = Keys::new(DEFAULT_KEYS);
        String::from_utf8(Scrubber::scrub(&keys, input.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn values_of_sensitive_keys_are_masked_whatever_their_type() {
        assert_eq!(
            scrub(r#"{"a":"x","password":"hunter2","b":1}"#),
            r#"{"a":"x","password":"[redacted]","b":1}"#
        );
        assert_eq!(
            scrub(r#"{"SessionToken" : "s\"e\\cret", "n": 2}"#),
            r#"{"SessionToken" : "[redacted]", "n": 2}"#
        );
        assert_eq!(
            scrub(r#"{"credentials":{"sessionToken":"x","k":[1,"}"]},"z":0}"#),
            r#"{"credentials":"[redacted]","z":0}"#
        );
        assert_eq!(
            scrub(r#"{"password":12345,"x":true}"#),
            r#"{"password":"[redacted]","x":true}"#
        );
        // A key name as a value is not a key.
        assert_eq!(
            scrub(r#"{"eventName":"password","x":"y"}"#),
            r#"{"eventName":"password","x":"y"}"#
        );
    }

    #[test]
    fn malformed_and_cut_off_input_is_masked_too() {
        // No colon, a value cut off by the end of the bytes, a broken object.
        assert_eq!(
            scrub(r#"{"password" "hunter2" }"#),
            r#"{"password" "[redacted]" }"#
        );
        assert_eq!(
            scrub(r#"{"x":1,"secretAccessKey":"AKIAabc"#),
            r#"{"x":1,"secretAccessKey":"[redacted]""#
        );
        assert_eq!(
            scrub(r#"{"x":tru,"privateKey":{"pem":"-----BEGIN"#),
            r#"{"x":tru,"privateKey":"[redacted]""#
        );
    }

    #[test]
    fn a_stream_fed_in_any_pieces_is_masked_the_same() {
        let input = br#"junk "a" : 1, "sessionToken":"tok\"en-value-xyz", "Password" : {"p":"]"}, "k":"v"}"#;
        let keys = Keys::new(DEFAULT_KEYS);
        let whole = Scrubber::new(&keys).feed(input);
        assert!(!String::from_utf8_lossy(&whole).contains("tok"));
        assert!(!String::from_utf8_lossy(&whole).contains("\"p\""));
        for cut in 0..input.len() {
            let mut s = Scrubber::new(&keys);
            let mut out = s.feed(&input[..cut]);
            out.extend(s.feed(&input[cut..]));
            assert_eq!(out, whole, "cut {cut}");
        }
    }

    #[test]
    fn json_inside_a_string_is_masked_too() {
        // A message that embeds JSON (a Kinesis record that is not an event, kept as a string).
        let inner = r#"{"user":"a","password":"hun\"ter2","k":{"secretKey":[1,"]"]},"n":1}"#;
        let outer = serde_json::to_string(&vec![inner]).unwrap();
        let out = scrub(&outer);
        assert!(!out.contains("hun") && !out.contains("ter2"), "{out}");
        let back: Vec<String> = serde_json::from_str(&out).unwrap();
        let v: serde_json::Value = serde_json::from_str(&back[0]).unwrap();
        assert_eq!(v["password"], "[redacted]");
        assert_eq!(v["k"]["secretKey"], "[redacted]");
        assert_eq!(v["n"], 1);
    }

    #[test]
    fn json_in_a_string_in_a_string_is_masked_too() {
        // A message holding JSON with a field that holds JSON: three levels of quotes.
        let inner = r#"{"password":"hun\"ter2","k":{"secretKey":[1,"]"]},"t":9,"n":1}"#;
        let middle = serde_json::to_string(&serde_json::json!({"body": inner, "m": 2})).unwrap();
        let outer = serde_json::to_string(&vec![middle]).unwrap();
        let out = scrub(&outer);
        assert!(!out.contains("hun") && !out.contains("ter2"), "{out}");
        let back: Vec<String> = serde_json::from_str(&out).unwrap();
        let middle: serde_json::Value = serde_json::from_str(&back[0]).unwrap();
        assert_eq!(middle["m"], 2);
        let v: serde_json::Value = serde_json::from_str(middle["body"].as_str().unwrap()).unwrap();
        assert_eq!(v["password"], "[redacted]");
        assert_eq!(v["k"]["secretKey"], "[redacted]");
        assert_eq!(v["n"], 1);
        // A plain key whose name ends in an escaped backslash is still at the plain level.
        assert_eq!(
            scrub(r#"{"password\\":"x","a":1}"#),
            r#"{"password\\":"[redacted]","a":1}"#
        );
    }

    #[test]
    fn valid_json_stays_valid() {
        let input =
            r#"{"a":[{"password":"x"},{"clientSecret":[1,{"b":"c"}]}],"sessionToken":null}"#;
        let out = scrub(input);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["a"][0]["password"], "[redacted]");
        assert_eq!(v["sessionToken"], "[redacted]");
    }

    #[test]
    fn escaped_key_names_are_keys_too() {
        // What any JSON reader decodes to `sessionToken`, `Password` or `secretKey`.
        assert_eq!(
            scrub(r#"{"session\u0054oken":"tok-1","x":1}"#),
            r#"{"session\u0054oken":"[redacted]","x":1}"#
        );
        assert_eq!(
            scrub(r#"{"\u0050\u0061\u0073\u0073\u0077\u006F\u0072\u0064":"pw-1"}"#),
            r#"{"\u0050\u0061\u0073\u0073\u0077\u006F\u0072\u0064":"[redacted]"}"#
        );
        assert_eq!(
            scrub(r#"{"secret\/Key":"sk","SECRETKEY":"sk"}"#),
            r#"{"secret\/Key":"sk","SECRETKEY":"[redacted]"}"#,
            "an escape that decodes to another name is another key"
        );
        // Inside an embedded string the escape is itself escaped.
        let inner = r#"{"session\u0054oken":"tok-2"}"#;
        let outer = serde_json::to_string(&vec![inner]).unwrap();
        assert!(!scrub(&outer).contains("tok-2"), "{}", scrub(&outer));
        // A JSON reader agrees these are the keys.
        let v: serde_json::Value =
            serde_json::from_str(r#"{"session\u0054oken":"tok-1"}"#).unwrap();
        assert!(v.get("sessionToken").is_some());
    }

    #[test]
    fn no_keys_changes_nothing() {
        let keys = Keys::new::<&str>(&[]);
        let input = br#"{"password":"x"}"#;
        assert!(matches!(
            Scrubber::scrub(&keys, input),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
