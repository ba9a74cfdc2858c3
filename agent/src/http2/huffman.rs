//! The HPACK Huffman code (RFC 7541 §5.2, Appendix B), decoding only.
//!
//! The code is canonical: codes of equal length are consecutive and ordered by symbol, and
//! shorter codes sort before longer ones. So the code lengths of Appendix B define it entirely,
//! and a decoder needs, per length, the first code and where its symbols start. Decoding then
//! compares a left-aligned 32-bit window against the per-length limits; the common symbols
//! (5 to 8 bits) are found within the first four comparisons.

/// Code length in bits of each symbol 0..=255 and EOS (256), RFC 7541 Appendix B.
const CODE_LEN: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, //
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, //
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, //
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, //
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, //
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, //
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, //
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, //
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, //
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, //
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, //
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, //
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, //
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, //
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, //
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, //
    30,
];

const EOS: u16 = 256;
const MAX_LEN: usize = 30;

/// The canonical code, derived from [`CODE_LEN`] at compile time.
struct Canonical {
    /// Distinct code lengths, ascending; `count` entries are used.
    lens: [u8; MAX_LEN],
    /// Left-aligned (in 32 bits) exclusive limit of the codes of each length: a window below
    /// `limit[k]` (and not below `limit[k - 1]`) starts with a code of length `lens[k]`.
    limit: [u64; MAX_LEN],
    /// First code of each length, right-aligned.
    first: [u32; MAX_LEN],
    /// Index in `symbols` of the first symbol of each length.
    offset: [u16; MAX_LEN],
    count: usize,
    /// Symbols ordered by (code length, symbol).
    symbols: [u16; 257],
}

const fn canonical() -> Canonical {
    let mut c = Canonical {
        lens: [0; MAX_LEN],
        limit: [0; MAX_LEN],
        first: [0; MAX_LEN],
        offset: [0; MAX_LEN],
        count: 0,
        symbols: [0; 257],
    };
    let mut code: u32 = 0;
    let mut placed: usize = 0;
    let mut len = 1;
    while len <= MAX_LEN {
        let mut n: u32 = 0;
        let mut sym = 0;
        while sym < 257 {
            if CODE_LEN[sym] as usize == len {
                c.symbols[placed + n as usize] = sym as u16;
                n += 1;
            }
            sym += 1;
        }
        if n > 0 {
            let k = c.count;
            c.lens[k] = len as u8;
            c.first[k] = code;
            c.offset[k] = placed as u16;
            c.limit[k] = ((code + n) as u64) << (32 - len);
            c.count += 1;
            placed += n as usize;
        }
        code = (code + n) << 1;
        len += 1;
    }
    c
}

static CODE: Canonical = canonical();

/// Why a Huffman string could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HuffmanError {
    /// The EOS symbol appeared inside the string (RFC 7541 §5.2: a decoding error).
    Eos,
    /// The string did not end in at most 7 bits of EOS prefix (all ones).
    BadPadding,
}

/// Decodes `src` and appends the octets to `out`.
pub(super) fn decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), HuffmanError> {
    // At most 8/5 octets per input octet: the shortest code has 5 bits.
    out.reserve(src.len() * 8 / 5);
    // `acc` holds `nbits` unread bits, left-aligned.
    let mut acc: u64 = 0;
    let mut nbits: u32 = 0;
    let mut next = 0;
    loop {
        while nbits <= 56 && next < src.len() {
            acc |= u64::from(src[next]) << (56 - nbits);
            nbits += 8;
            next += 1;
        }
        if nbits == 0 {
            return Ok(());
        }
        // Past the end the window reads as ones, so a valid padding looks like the start of a
        // code longer than what is left.
        let mut window = (acc >> 32) as u32;
        if nbits < 32 {
            window |= u32::MAX >> nbits;
        }
        let mut k = 0;
        // The last limit is 2^32 (the code is complete), so this stops within `count`.
        while k + 1 < CODE.count && u64::from(window) >= CODE.limit[k] {
            k += 1;
        }
        let len = u32::from(CODE.lens[k]);
        if len > nbits {
            let rest = acc >> (64 - nbits);
            return if nbits <= 7 && rest == (1 << nbits) - 1 {
                Ok(())
            } else {
                Err(HuffmanError::BadPadding)
            };
        }
        let code = window >> (32 - len);
        let index = usize::from(CODE.offset[k]) + (code - CODE.first[k]) as usize;
        let sym = CODE.symbols[index];
        if sym == EOS {
            return Err(HuffmanError::Eos);
        }
        out.push(sym as u8);
        acc <<= len;
        nbits -= len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn decoded(s: &str) -> Result<Vec<u8>, HuffmanError> {
        let mut out = Vec::new();
        decode(&hex(s), &mut out).map(|()| out)
    }

    /// Encodes with the canonical code rebuilt independently (bit by bit from the lengths),
    /// so round trips check the decoder's tables.
    fn encode(input: &[u8]) -> Vec<u8> {
        let mut codes = [0u32; 257];
        let mut code = 0u32;
        let mut prev_len = 0u32;
        let mut order: Vec<usize> = (0..257).collect();
        order.sort_by_key(|&s| (CODE_LEN[s], s));
        for (i, &s) in order.iter().enumerate() {
            let len = u32::from(CODE_LEN[s]);
            if i > 0 {
                code = (code + 1) << (len - prev_len);
            }
            prev_len = len;
            codes[s] = code;
        }
        let (mut out, mut acc, mut n) = (Vec::new(), 0u64, 0u32);
        for &b in input {
            let len = u32::from(CODE_LEN[usize::from(b)]);
            acc = (acc << len) | u64::from(codes[usize::from(b)]);
            n += len;
            while n >= 8 {
                out.push((acc >> (n - 8)) as u8);
                n -= 8;
            }
        }
        if n > 0 {
            let pad = 8 - n;
            out.push(((acc << pad) as u8) | ((1u8 << pad) - 1));
        }
        out
    }

    #[test]
    fn code_is_complete_and_canonical() {
        // Kraft sum of exactly 1: every bit string starts with a code.
        let kraft: f64 = CODE_LEN.iter().map(|&l| 2f64.powi(-i32::from(l))).sum();
        assert_eq!(kraft, 1.0);
        assert_eq!(CODE.limit[CODE.count - 1], 1 << 32);
        // Spot checks against Appendix B: '0' = 00000, ' ' = 010100, 'a' = 00011, EOS = 30 ones.
        assert_eq!(CODE.first[0], 0);
        assert_eq!(CODE.symbols[0], u16::from(b'0'));
        assert_eq!(CODE.symbols[3], u16::from(b'a'));
        assert_eq!(CODE.first[1], 0b010100);
        assert_eq!(CODE.symbols[usize::from(CODE.offset[1])], u16::from(b' '));
        assert_eq!(CODE.symbols[256], EOS);
    }

    /// RFC 7541 Appendix C.4 and C.6 strings.
    #[test]
    fn rfc_examples() {
        let cases = [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
            ("6402", "302"),
            ("aec3 771a 4b", "private"),
            (
                "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff",
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
            (
                "9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3",
                "https://www.example.com",
            ),
            ("9bd9 ab", "gzip"),
            (
                "94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
                "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
            ),
            ("", ""),
        ];
        for (src, want) in cases {
            assert_eq!(decoded(src), Ok(want.as_bytes().to_vec()), "{want}");
            assert_eq!(encode(want.as_bytes()), hex(src), "{want}");
        }
    }

    #[test]
    fn every_octet_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        let mut out = Vec::new();
        decode(&encode(&all), &mut out).unwrap();
        assert_eq!(out, all);
        for b in 0..=255u8 {
            let mut out = Vec::new();
            decode(&encode(&[b, b'x', b]), &mut out).unwrap();
            assert_eq!(out, [b, b'x', b]);
        }
    }

    #[test]
    fn invalid_strings() {
        // EOS (30 ones) followed by padding.
        assert_eq!(decoded("ffff fffc"), Err(HuffmanError::Eos));
        // Eight ones of padding: too long.
        assert_eq!(decoded("ff"), Err(HuffmanError::BadPadding));
        // Padding with a zero bit: '0' is 00000, then 000 is not an EOS prefix.
        assert_eq!(decoded("00"), Err(HuffmanError::BadPadding));
        // 'a' (00011) followed by 111 padding is fine.
        assert_eq!(decoded("1f"), Ok(b"a".to_vec()));
    }

    proptest::proptest! {
        #[test]
        fn round_trip(input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let mut out = Vec::new();
            decode(&encode(&input), &mut out).unwrap();
            proptest::prop_assert_eq!(out, input);
        }

        #[test]
        fn any_input_is_survivable(input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let mut out = Vec::new();
            let _ = decode(&input, &mut out);
            proptest::prop_assert!(out.len() <= input.len() * 8 / 5);
        }
    }
}
