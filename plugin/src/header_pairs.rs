//! A header map as proxy-wasm hands it over (`proxy_get_header_map_pairs`), read where
//! it lies: the filter asks for one header's values and whether it is repeated, which
//! needs neither a vector of pairs nor a copy of each name and value (deserialising
//! a request's map costs some twenty allocations).
//!
//! The layout (proxy-wasm ABI 0.2, integers little-endian u32): the number of pairs
//! `n`, then `n` pairs of (name length, value length), then for each pair its name, a
//! NUL byte, its value and a NUL byte. Every length and offset is checked against the
//! buffer: a buffer that does not hold what it claims is read as far as it is valid and
//! reported as [`Malformed`].

/// The buffer does not hold the pairs its header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// What a header map holds under one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Values<'b> {
    /// The first value, if any.
    pub first: Option<&'b [u8]>,
    /// How many values the name has.
    pub count: usize,
}

/// The values of header `name` in `buffer` (names compare exactly: hosts hand them
/// over in lower case, and the filter asks in lower case).
pub fn values<'b>(buffer: &'b [u8], name: &[u8]) -> Result<Values<'b>, Malformed> {
    let mut found = Values::default();
    for pair in pairs(buffer)? {
        let (held_name, value) = pair?;
        if held_name == name {
            found.first = found.first.or(Some(value));
            found.count += 1;
        }
    }
    Ok(found)
}

/// The pairs of `buffer`, in order; an empty buffer is an empty map.
pub fn pairs(buffer: &[u8]) -> Result<Pairs<'_>, Malformed> {
    if buffer.is_empty() {
        return Ok(Pairs {
            buffer,
            lengths: &[],
            data: 0,
        });
    }
    let count = read_u32(buffer, 0).ok_or(Malformed)?;
    let lengths_end = count
        .checked_mul(8)
        .and_then(|size| size.checked_add(4))
        .ok_or(Malformed)?;
    let lengths = buffer.get(4..lengths_end).ok_or(Malformed)?;
    Ok(Pairs {
        buffer,
        lengths,
        data: lengths_end,
    })
}

/// The pairs of a header map buffer; see [`pairs`].
#[derive(Debug)]
pub struct Pairs<'b> {
    buffer: &'b [u8],
    /// The (name length, value length) pairs not yet read.
    lengths: &'b [u8],
    /// Where the next name starts.
    data: usize,
}

impl<'b> Iterator for Pairs<'b> {
    type Item = Result<(&'b [u8], &'b [u8]), Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        let (lengths, rest) = self.lengths.split_at_checked(8)?;
        self.lengths = rest;
        let mut read = || {
            let name_len = read_u32(lengths, 0)?;
            let value_len = read_u32(lengths, 4)?;
            let name = self.field(name_len)?;
            let value = self.field(value_len)?;
            Some((name, value))
        };
        let pair = read().ok_or(Malformed);
        if pair.is_err() {
            // Nothing after a bad length can be trusted.
            self.lengths = &[];
        }
        Some(pair)
    }
}

impl<'b> Pairs<'b> {
    /// The next `len` bytes of data and the NUL after them.
    fn field(&mut self, len: usize) -> Option<&'b [u8]> {
        let end = self.data.checked_add(len)?;
        let field = self.buffer.get(self.data..end)?;
        self.data = end.checked_add(1)?;
        (self.buffer.get(end) == Some(&0)).then_some(field)
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    let word = <[u8; 4]>::try_from(word).ok()?;
    usize::try_from(u32::from_le_bytes(word)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map serialised as proxy-wasm hosts do.
    fn serialise(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut buffer = Vec::new();
        buffer.extend_from_slice(&u32::try_from(pairs.len()).unwrap().to_le_bytes());
        for (name, value) in pairs {
            buffer.extend_from_slice(&u32::try_from(name.len()).unwrap().to_le_bytes());
            buffer.extend_from_slice(&u32::try_from(value.len()).unwrap().to_le_bytes());
        }
        for (name, value) in pairs {
            buffer.extend_from_slice(name);
            buffer.push(0);
            buffer.extend_from_slice(value);
            buffer.push(0);
        }
        buffer
    }

    /// proxy-wasm-rust-sdk's deserialiser (`utils::deserialize_map_bytes`, 0.2.5),
    /// restated: the reference for valid buffers.
    fn sdk_deserialise(bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        if bytes.is_empty() {
            return Vec::new();
        }
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let size = word(0);
        let mut map = Vec::with_capacity(size);
        let mut p = 4 + size * 8;
        for n in 0..size {
            let s = 4 + n * 8;
            let key = bytes[p..p + word(s)].to_vec();
            p += word(s) + 1;
            let value = bytes[p..p + word(s + 4)].to_vec();
            p += word(s + 4) + 1;
            map.push((key, value));
        }
        map
    }

    /// A small seeded generator (xorshift64*): the same cases on every run.
    struct Draw(u64);

    impl Draw {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, bound: u64) -> usize {
            usize::try_from(self.next() % bound).unwrap()
        }
        fn bytes(&mut self, max: u64, alphabet: &[u8]) -> Vec<u8> {
            let len = self.below(max + 1);
            (0..len)
                .map(|_| alphabet[self.below(alphabet.len() as u64)])
                .collect()
        }
    }

    #[test]
    fn one_header_is_found_with_its_count() {
        let buffer = serialise(&[
            (b":path".to_vec(), b"/v1".to_vec()),
            (b"x-tenant-id".to_vec(), b"acme".to_vec()),
            (b"accept".to_vec(), Vec::new()),
        ]);
        let found = values(&buffer, b"x-tenant-id").unwrap();
        assert_eq!(found.first, Some(&b"acme"[..]));
        assert_eq!(found.count, 1);
        assert_eq!(values(&buffer, b"x-tenant").unwrap(), Values::default());
        assert_eq!(values(&buffer, b"accept").unwrap().first, Some(&b""[..]));
        assert_eq!(values(&[], b"x-tenant-id").unwrap(), Values::default());
    }

    #[test]
    fn a_repeated_header_counts_every_value_and_keeps_the_first() {
        let buffer = serialise(&[
            (b"x-tenant-id".to_vec(), b"acme".to_vec()),
            (b"accept".to_vec(), b"*/*".to_vec()),
            (b"x-tenant-id".to_vec(), b"globex".to_vec()),
        ]);
        let found = values(&buffer, b"x-tenant-id").unwrap();
        assert_eq!((found.first, found.count), (Some(&b"acme"[..]), 2));
    }

    #[test]
    fn a_buffer_that_lies_about_its_lengths_is_malformed() {
        let good = serialise(&[(b"x-tenant-id".to_vec(), b"acme".to_vec())]);
        for cut in 1..good.len() {
            assert_eq!(
                values(&good[..cut], b"x-tenant-id"),
                Err(Malformed),
                "cut at {cut}"
            );
        }
        let mut no_nul = good.clone();
        let last = no_nul.len() - 1;
        no_nul[last] = b'x';
        assert_eq!(values(&no_nul, b"x-tenant-id"), Err(Malformed));
        let huge = [0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0];
        assert_eq!(values(&huge, b"a"), Err(Malformed));
    }

    #[test]
    fn valid_buffers_read_as_the_sdk_reads_them() {
        let mut draw = Draw(0x5eed_0001);
        for _ in 0..5_000 {
            let count = draw.below(8);
            let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..count)
                .map(|_| (draw.bytes(3, b"ab\0"), draw.bytes(6, b"xy\0\xff")))
                .collect();
            let buffer = serialise(&pairs);
            let reference = sdk_deserialise(&buffer);
            for name in [&b"a"[..], b"b", b"ab", b"", b"a\0"] {
                let wanted: Vec<&Vec<u8>> = reference
                    .iter()
                    .filter(|(held, _)| held == name)
                    .map(|(_, value)| value)
                    .collect();
                let found = values(&buffer, name).unwrap();
                assert_eq!(found.count, wanted.len(), "{pairs:?}");
                assert_eq!(found.first, wanted.first().map(|value| value.as_slice()));
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut draw = Draw(0x5eed_0002);
        for _ in 0..20_000 {
            let mut buffer = draw.bytes(64, &[0, 1, 2, 3, 8, b'a', 0xff]);
            if draw.below(2) == 0 {
                // A plausible count, so that the lengths and data are walked.
                let count = u8::try_from(draw.below(4)).unwrap();
                buffer.splice(0..0, [count, 0, 0, 0]);
            }
            let _ = values(&buffer, b"a");
            let _ = pairs(&buffer).map(|pairs| pairs.count());
        }
    }
}
