//! A scanner for the JSON most sensors send: one flat object of numbers and short strings,
//! such as `{"ts": 1700000000123, "temp": 21.5, "hum": 40}`.
//!
//! It reads such an object in one pass without building anything, and keeps the values of
//! the keys it is asked for. It takes only a subset of JSON, where its answer is by
//! construction what `serde_json` gives: keys and strings of printable ASCII without
//! escapes, numbers as `serde_json` parses them (with its `float_roundtrip` feature: the
//! nearest double, so a value a sensor wrote in its shortest round-trip form is stored with
//! the same bits), `true`, `false` and `null`. On anything else (a nested value, an escape, non-ASCII text,
//! a number it cannot convert the same way, invalid JSON) it gives up, and the caller parses
//! the document with `serde_json`, which also words every error.

/// The most keys one scan looks for.
pub const MAX_KEYS: usize = 8;

/// A scalar JSON value, as the document parser would hold it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scalar<'a> {
    /// A number, converted to `f64` as `serde_json::Number::as_f64` does.
    Number(f64),
    Bool(bool),
    /// A string without escapes: its text is the payload's bytes.
    Str(&'a str),
    Null,
}

/// The value of each of `keys` in `payload`, the last one where a key repeats (as a parsed
/// map keeps it); `None` when `payload` is not a flat object this scanner takes.
pub fn scan<'a>(
    payload: &'a [u8],
    keys: &[impl AsRef<str>],
) -> Option<[Option<Scalar<'a>>; MAX_KEYS]> {
    if keys.len() > MAX_KEYS {
        return None;
    }
    let mut picked = [None; MAX_KEYS];
    let mut s = Scanner { rest: payload };
    s.skip_space();
    s.require(b'{')?;
    s.skip_space();
    if !s.eat(b'}') {
        loop {
            let key = s.string()?;
            s.skip_space();
            s.require(b':')?;
            s.skip_space();
            let value = s.scalar()?;
            if let Some(slot) = keys.iter().position(|k| k.as_ref().as_bytes() == key) {
                picked[slot] = Some(value);
            }
            s.skip_space();
            if s.eat(b'}') {
                break;
            }
            s.require(b',')?;
            s.skip_space();
        }
    }
    s.skip_space();
    s.rest.is_empty().then_some(picked)
}

/// What is left of the payload to read.
struct Scanner<'a> {
    rest: &'a [u8],
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// Takes `byte` if it comes next.
    fn eat(&mut self, byte: u8) -> bool {
        match self.rest.split_first() {
            Some((&first, rest)) if first == byte => {
                self.rest = rest;
                true
            }
            _ => false,
        }
    }

    fn require(&mut self, byte: u8) -> Option<()> {
        self.eat(byte).then_some(())
    }

    /// JSON's whitespace: space, tab, line feed, carriage return.
    fn skip_space(&mut self) {
        while let Some((b' ' | b'\t' | b'\n' | b'\r', rest)) = self.rest.split_first() {
            self.rest = rest;
        }
    }

    /// A string of printable ASCII (and DEL) without escapes: its bytes, without quotes.
    fn string(&mut self) -> Option<&'a [u8]> {
        self.require(b'"')?;
        let len = self
            .rest
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || !(0x20..=0x7f).contains(&b))?;
        let (text, rest) = self.rest.split_at(len);
        self.rest = rest;
        self.require(b'"')?;
        Some(text)
    }

    fn scalar(&mut self) -> Option<Scalar<'a>> {
        match self.peek()? {
            // ASCII only, so always UTF-8.
            b'"' => std::str::from_utf8(self.string()?).ok().map(Scalar::Str),
            b't' => self.word(b"true", Scalar::Bool(true)),
            b'f' => self.word(b"false", Scalar::Bool(false)),
            b'n' => self.word(b"null", Scalar::Null),
            _ => self.number().map(Scalar::Number),
        }
    }

    fn word(&mut self, word: &[u8], value: Scalar<'a>) -> Option<Scalar<'a>> {
        self.rest = self.rest.strip_prefix(word)?;
        Some(value)
    }

    /// Digits onto `significand`; how many. `None` past [`MAX_DIGITS`] in all.
    fn digits(&mut self, significand: &mut u64, count: &mut usize) -> Option<usize> {
        let mut taken = 0;
        while let Some((&digit @ b'0'..=b'9', rest)) = self.rest.split_first() {
            if *count == MAX_DIGITS {
                return None;
            }
            *significand = *significand * 10 + u64::from(digit - b'0');
            taken += 1;
            *count += 1;
            self.rest = rest;
        }
        Some(taken)
    }

    /// A JSON number, converted as `serde_json` converts it: an integer becomes a `u64` or
    /// `i64` (`-0` the float -0.0) and then `f64`; a decimal becomes the nearest double.
    /// `None` where `serde_json` might take another route (more digits than [`MAX_DIGITS`])
    /// or give an error (beyond a double's range), or the text is no number.
    fn number(&mut self) -> Option<f64> {
        let start = self.rest;
        let positive = !self.eat(b'-');
        let leading_zero = self.peek() == Some(b'0');
        let mut significand = 0u64;
        let mut count = 0;
        let whole = self.digits(&mut significand, &mut count)?;
        // One digit, or several without a leading zero.
        if whole == 0 || (whole > 1 && leading_zero) {
            return None;
        }
        let mut exponent: i32 = 0;
        let mut integer = true;
        if self.eat(b'.') {
            let fraction = self.digits(&mut significand, &mut count)?;
            if fraction == 0 {
                return None;
            }
            exponent -= fraction as i32;
            integer = false;
        }
        if self.eat(b'e') || self.eat(b'E') {
            let negative = self.eat(b'-');
            if !negative {
                self.eat(b'+');
            }
            let mut value = 0u64;
            let mut digits = 0;
            // Four digits of exponent reach past what this converts anyway.
            match self.digits(&mut value, &mut digits) {
                Some(1..=4) => {}
                _ => return None,
            }
            exponent += if negative {
                -(value as i32)
            } else {
                value as i32
            };
            integer = false;
        }
        if integer {
            return Some(if positive {
                significand as f64
            } else {
                let negated = (significand as i64).wrapping_neg();
                if negated >= 0 {
                    -(significand as f64)
                } else {
                    negated as f64
                }
            });
        }
        let exact_power = POW10.get(exponent.unsigned_abs() as usize);
        if let Some(power) = exact_power.filter(|_| significand <= MAX_EXACT) {
            // Both operands exact, so the one rounding of the product or quotient gives the
            // nearest double: what a correctly rounded parser gives.
            let magnitude = if exponent >= 0 {
                significand as f64 * power
            } else {
                significand as f64 / power
            };
            return Some(if positive { magnitude } else { -magnitude });
        }
        // More digits than a double holds exactly (a shortest round-trip form of a computed
        // value often has 17) or a larger power: the standard library's parser, correctly
        // rounded like `serde_json`'s. Beyond a double's range `serde_json` gives an error.
        let text = std::str::from_utf8(&start[..start.len() - self.rest.len()]).ok()?;
        text.parse::<f64>().ok().filter(|v| v.is_finite())
    }
}

/// The most digits of a number this converts: any 19 digits fit a `u64`, as `serde_json`
/// reads them; beyond that it may switch to reading a float.
const MAX_DIGITS: usize = 19;

/// The largest significand every integer up to which an `f64` holds exactly: 2^53.
const MAX_EXACT: u64 = 1 << 53;

/// The powers of ten that are exact in an `f64`.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    /// What the document parser makes of the same text, as a [`Scalar`].
    fn parsed(text: &str) -> Option<Scalar<'_>> {
        let value: Value = serde_json::from_str(text).ok()?;
        Some(match value {
            Value::Number(n) => Scalar::Number(n.as_f64()?),
            Value::Bool(b) => Scalar::Bool(b),
            Value::String(_) => Scalar::Str(text.trim().trim_matches('"')),
            Value::Null => Scalar::Null,
            _ => return None,
        })
    }

    fn scanned(text: &str) -> Option<Scalar<'_>> {
        let payload = format!("{{\"v\": {text}}}");
        let picked = scan(payload.as_bytes(), &["v"])?;
        // A string borrows the payload; it is the same text inside `text`.
        Some(match picked[0]? {
            Scalar::Str(_) => Scalar::Str(text.trim().trim_matches('"')),
            Scalar::Number(n) => Scalar::Number(n),
            Scalar::Bool(b) => Scalar::Bool(b),
            Scalar::Null => Scalar::Null,
        })
    }

    #[test]
    fn picks_the_asked_keys_of_a_sensor_payload() {
        let payload = br#" {"ts": 1700000000123, "temp": 21.5, "hum": 40, "rssi": -70, "ok": true, "id": "a-1", "x": null} "#;
        let picked = scan(payload, &["temp", "hum", "ts", "id", "missing"]).unwrap();
        assert_eq!(picked[0], Some(Scalar::Number(21.5)));
        assert_eq!(picked[1], Some(Scalar::Number(40.0)));
        assert_eq!(picked[2], Some(Scalar::Number(1_700_000_000_123.0)));
        assert_eq!(picked[3], Some(Scalar::Str("a-1")));
        assert_eq!(picked[4], None);
    }

    #[test]
    fn the_last_of_a_repeated_key_wins() {
        let picked = scan(br#"{"t": 1, "t": 2}"#, &["t"]).unwrap();
        assert_eq!(picked[0], Some(Scalar::Number(2.0)));
    }

    #[test]
    fn gives_up_on_what_it_does_not_take() {
        for payload in [
            "",
            "[]",
            "{",
            r#"{"t": 1"#,
            r#"{"t": 1,}"#,
            r#"{"t" 1}"#,
            r#"{"t": 1} x"#,
            r#"{"t": {"a": 1}}"#,
            r#"{"t": [1]}"#,
            r#"{"t\u0065": 1}"#,
            r#"{"t": "caf\u00e9"}"#,
            "{\"t\": \"caf\u{e9}\"}",
            "{\"t\": \"a\tb\"}",
            r#"{"t": 01}"#,
            r#"{"t": 1.}"#,
            r#"{"t": .5}"#,
            r#"{"t": 1e}"#,
            r#"{"t": +1}"#,
            r#"{"t": tru}"#,
            r#"{"t": 123456789012345678901}"#,
            // Beyond a double's range: serde_json's error words it.
            r#"{"t": 1e400}"#,
            // Twenty digits: more than a u64 is sure to hold (found by the property below).
            r#"{"t": 20000000000000000.000}"#,
        ] {
            assert_eq!(scan(payload.as_bytes(), &["t"]), None, "{payload}");
        }
    }

    #[test]
    fn numbers_convert_as_the_document_parser_converts_them() {
        for text in [
            "0",
            "-0",
            "-0.0",
            "21.5",
            "-40.25",
            "1e3",
            "1E+3",
            "25e-1",
            "0.1",
            "0.30000000000000004",
            "9007199254740993",
            "-9223372036854775808",
            "-9223372036854775809",
            "9999999999999999999",
            "123456789.123456789",
            "1e22",
            "1e23",
            "1.5e-21",
            "90.28571428571429",
            "2.2250738585072014e-308",
            "1e-400",
        ] {
            let ours = scanned(text).unwrap_or_else(|| panic!("{text} not taken"));
            let theirs = parsed(text).unwrap();
            match (ours, theirs) {
                (Scalar::Number(a), Scalar::Number(b)) => {
                    assert_eq!(a.to_bits(), b.to_bits(), "{text}: {a} vs {b}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_shortest_round_trip_form_gives_back_the_same_bits() {
        for value in [
            632.0_f64 / 7.0,
            0.1 + 0.2,
            21.123456789012345,
            -1.0 / 3.0,
            5e-324,
            1e300,
        ] {
            let text = format!("{value:?}");
            match scanned(&text) {
                Some(Scalar::Number(got)) => assert_eq!(got.to_bits(), value.to_bits(), "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    /// Number-like text: JSON numbers of every shape and some that are not.
    fn number_text() -> impl Strategy<Value = String> {
        (
            prop::option::of(Just("-")),
            prop_oneof![Just("0".to_string()), "[0-9]{1,21}"],
            prop::option::of("\\.[0-9]{0,20}"),
            prop::option::of("[eE][+-]?[0-9]{0,5}"),
        )
            .prop_map(|(sign, whole, fraction, exponent)| {
                format!(
                    "{}{whole}{}{}",
                    sign.unwrap_or(""),
                    fraction.unwrap_or_default(),
                    exponent.unwrap_or_default()
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        /// Whatever number-like text the scanner takes, it converts to the bits the document
        /// parser gives; what it takes is valid JSON.
        #[test]
        fn a_taken_number_has_the_document_parsers_bits(text in number_text()) {
            if let Some(ours) = scanned(&text) {
                let theirs = parsed(&text);
                match (ours, theirs) {
                    (Scalar::Number(a), Some(Scalar::Number(b))) => {
                        prop_assert_eq!(a.to_bits(), b.to_bits(), "{}", text);
                    }
                    other => prop_assert!(false, "{}: {:?}", text, other),
                }
            }
        }

        /// Any finite double, written in its shortest round-trip form (as a sensor's JSON
        /// encoder writes it), is read back with the same bits.
        #[test]
        fn every_double_comes_back_exactly(value in any::<f64>().prop_filter("finite", |v| v.is_finite())) {
            let text = format!("{value:?}");
            let got = match scanned(&text).or_else(|| parsed(&text)) {
                Some(Scalar::Number(got)) => got,
                other => return Err(TestCaseError::fail(format!("{text}: {other:?}"))),
            };
            prop_assert_eq!(got.to_bits(), value.to_bits(), "{}", text);
        }

        /// Bytes in and around an object: anything the scanner takes, `serde_json` takes as
        /// the same object.
        #[test]
        fn what_it_takes_is_json_with_the_same_values(
            prefix in "[ \t\r\n{\"a:,]{0,3}",
            members in prop::collection::vec(("[a-c\\\\\"é]{0,2}", "[-0-9.eE+ a-z\"\\[\\]{}]{0,6}"), 0..4),
            suffix in "[ \t\r\n},x]{0,3}",
        ) {
            let body: Vec<String> = members.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
            let payload = format!("{prefix}{{{}}}{suffix}", body.join(", "));
            let keys = ["a", "b", "c", ""];
            if let Some(picked) = scan(payload.as_bytes(), &keys) {
                let value: Value = serde_json::from_str(&payload)
                    .map_err(|e| TestCaseError::fail(format!("{payload}: {e}")))?;
                let object = value.as_object().ok_or_else(|| TestCaseError::fail(payload.clone()))?;
                for (slot, key) in keys.iter().enumerate() {
                    let expected = object.get(*key).map(|v| match v {
                        Value::Number(n) => Scalar::Number(n.as_f64().unwrap()),
                        Value::Bool(b) => Scalar::Bool(*b),
                        Value::String(s) => Scalar::Str(s),
                        Value::Null => Scalar::Null,
                        _ => unreachable!("the scanner took a nested value"),
                    });
                    match (picked[slot], expected) {
                        (Some(Scalar::Number(a)), Some(Scalar::Number(b))) => {
                            prop_assert_eq!(a.to_bits(), b.to_bits(), "{}", payload);
                        }
                        (a, b) => prop_assert_eq!(a, b, "{}", payload),
                    }
                }
            }
        }
    }
}
