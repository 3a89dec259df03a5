//! GPT-2's pre-tokenizer, hand-written: the text split exactly where the regex
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` splits it (the
//! `tokenizers` ByteLevel pre-tokenizer), without a regex engine: it runs on every byte of the
//! corpus, for training and for encoding. Tests check it against `tokenizers` itself.

use unicode_general_category::{get_general_category, GeneralCategory as Gc};

/// The pieces of `text`, in order; together they are `text`.
pub fn pieces(text: &str) -> Pieces<'_> {
    Pieces { text, at: 0 }
}

pub struct Pieces<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let rest = &self.text[self.at..];
        let first = rest.chars().next()?;
        let len = piece_len(rest, first);
        self.at += len;
        Some(&rest[..len])
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

fn class(c: char) -> Class {
    if c.is_ascii() {
        return match c {
            'a'..='z' | 'A'..='Z' => Class::Letter,
            '0'..='9' => Class::Number,
            ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c' => Class::Space,
            _ => Class::Other,
        };
    }
    if c.is_whitespace() {
        return Class::Space;
    }
    match get_general_category(c) {
        Gc::UppercaseLetter
        | Gc::LowercaseLetter
        | Gc::TitlecaseLetter
        | Gc::ModifierLetter
        | Gc::OtherLetter => Class::Letter,
        Gc::DecimalNumber | Gc::LetterNumber | Gc::OtherNumber => Class::Number,
        _ => Class::Other,
    }
}

/// The byte length of the piece at the start of `rest`, whose first character is `first`.
fn piece_len(rest: &str, first: char) -> usize {
    if first == '\'' {
        if let Some(len) = contraction(&rest.as_bytes()[1..]) {
            return 1 + len;
        }
    }
    // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional space, then a run of one class.
    let (prefix, head) = if first == ' ' {
        (1, rest[1..].chars().next())
    } else {
        (0, Some(first))
    };
    if let Some(head) = head {
        let kind = class(head);
        if kind != Class::Space {
            return prefix + run_len(&rest[prefix..], kind);
        }
    }
    // Whitespace: `\s+(?!\S)` gives the run but its last character when text follows (that
    // character then starts the next piece, as in ` word`); `\s+` takes a lone one.
    let run = run_len(rest, Class::Space);
    match rest[run..].chars().next() {
        Some(_) => {
            let last = rest[..run].chars().next_back().map_or(0, char::len_utf8);
            if run > last {
                run - last
            } else {
                run
            }
        }
        None => run,
    }
}

/// `'s|'t|'re|'ve|'m|'ll|'d` after the apostrophe: the matched length.
fn contraction(after: &[u8]) -> Option<usize> {
    match after {
        [b's' | b't' | b'm' | b'd', ..] => Some(1),
        [b'r', b'e', ..] | [b'v', b'e', ..] | [b'l', b'l', ..] => Some(2),
        _ => None,
    }
}

/// Bytes of the run of `kind` characters at the start of `text`.
fn run_len(text: &str, kind: Class) -> usize {
    text.char_indices()
        .find(|&(_, c)| class(c) != kind)
        .map_or(text.len(), |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    /// The pieces `tokenizers` makes, as byte ranges of the input.
    fn reference(text: &str) -> Vec<String> {
        let mut pre = PreTokenizedString::from(text);
        ByteLevel::new(false, false, true)
            .pre_tokenize(&mut pre)
            .unwrap();
        pre.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(_, (start, end), _)| text[start..end].to_string())
            .collect()
    }

    #[test]
    fn splits_as_the_gpt2_regex_does() {
        let cases = [
            "Hello world, it's 2024!",
            "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.",
            "  leading and   inner   spaces  ",
            "tabs\tand\r\nwindows\r\n\r\nlines \n\n end",
            "they'll we've I'm you'd isn't 'tis o'er 'S 'LL",
            "numbers 3.14159 and 1,000,000 and ½ ² Ⅻ",
            "naïve café — ünïcödé «quotes» 日本語のテキスト 한국어",
            "emoji 🦀🦀 and ZWJ 👩‍👩‍👧 and marks é (e + combining)",
            "no\u{a0}break\u{2003}em space\u{3000}ideographic\u{85}next",
            "symbols $$$ ... !!! ??? --- ___ @@@ ###",
            "trailing newline\n",
            "\n\n\n",
            " ",
            "a",
            "'",
            "x ' y '' z '''s",
        ];
        for text in cases {
            let ours: Vec<&str> = pieces(text).collect();
            assert_eq!(ours, reference(text), "{text:?}");
        }
    }

    #[test]
    fn random_texts_split_as_the_reference_does() {
        use rand::{Rng, SeedableRng};
        let alphabet: Vec<char> = "ab Z09 \n\t'.,!é日½ \u{a0}\u{2028}sltmdrevA-_"
            .chars()
            .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..3000 {
            let len = rng.random_range(0..24);
            let text: String = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let ours: Vec<&str> = pieces(&text).collect();
            assert_eq!(ours, reference(&text), "{text:?}");
        }
    }
}
