//! Scenario 6, footprint (module part): the size of `tokengate.wasm`, what its
//! sections hold, and whether `scripts/build-wasm` could run `wasm-opt` (binaryen) on it.
//! The memory part comes from the hit-path Envoys.

use std::path::Path;
use std::process::Command;

/// One section of a wasm module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// `code`, `data`, `custom:name`, ...
    pub name: String,
    /// Bytes, header included.
    pub bytes: usize,
}

/// What was found.
#[derive(Debug, Clone)]
pub struct Footprint {
    /// The module measured.
    pub path: String,
    /// Its size.
    pub bytes: u64,
    /// Its sections, largest first.
    pub sections: Vec<Section>,
    /// wasm-opt's version, or that it is not installed.
    pub wasm_opt_note: String,
    /// Code bytes by crate (from the function names in the `name` section), largest
    /// first; empty when the module has no `name` section.
    pub code_by_crate: Vec<(String, usize, usize)>,
    /// The largest functions: (crate, function name, bytes).
    pub largest_functions: Vec<(String, String, usize)>,
}

/// Measures the module at `path`.
pub fn run(path: &Path) -> Result<Footprint, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut sections = sections(&bytes)?;
    sections.sort_by_key(|section| std::cmp::Reverse(section.bytes));
    let functions = function_sizes(&bytes).unwrap_or_default();
    let mut by_crate: std::collections::BTreeMap<String, (usize, usize)> =
        std::collections::BTreeMap::new();
    for (name, size) in &functions {
        let entry = by_crate.entry(crate_of(name)).or_default();
        entry.0 += size;
        entry.1 += 1;
    }
    let mut code_by_crate: Vec<(String, usize, usize)> = by_crate
        .into_iter()
        .map(|(krate, (size, count))| (krate, size, count))
        .collect();
    code_by_crate.sort_by_key(|(_, size, _)| std::cmp::Reverse(*size));
    let mut largest: Vec<&(String, usize)> = functions.iter().collect();
    largest.sort_by_key(|(_, size)| std::cmp::Reverse(*size));
    let largest_functions = largest
        .into_iter()
        .take(12)
        .map(|(name, size)| (crate_of(name), readable(name), *size))
        .collect();
    let wasm_opt_note = match Command::new("wasm-opt").arg("--version").output() {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        }
        _ => "not installed (Debian package `binaryen`)".to_owned(),
    };
    Ok(Footprint {
        path: path.display().to_string(),
        bytes: bytes.len() as u64,
        sections,
        wasm_opt_note,
        code_by_crate,
        largest_functions,
    })
}

/// Splits a wasm binary into its sections.
pub fn sections(bytes: &[u8]) -> Result<Vec<Section>, String> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err("not a wasm module".into());
    }
    let ranges = section_ranges(bytes).ok_or("truncated section")?;
    let mut found = Vec::new();
    let mut previous_end = 8;
    for (id, start, end) in ranges {
        let name = match id {
            0 => {
                let (length, read) = leb128(&bytes[start..end]).ok_or("bad custom section")?;
                let name = bytes
                    .get(start + read..start + read + length)
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                format!("custom:{name}")
            }
            1 => "type".into(),
            2 => "import".into(),
            3 => "function".into(),
            4 => "table".into(),
            5 => "memory".into(),
            6 => "global".into(),
            7 => "export".into(),
            8 => "start".into(),
            9 => "element".into(),
            10 => "code".into(),
            11 => "data".into(),
            12 => "datacount".into(),
            other => format!("id {other}"),
        };
        found.push(Section {
            name,
            bytes: end - previous_end,
        });
        previous_end = end;
    }
    Ok(found)
}

/// An unsigned LEB128 number and how many bytes it took.
fn leb128(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value: usize = 0;
    for (i, byte) in bytes.iter().enumerate().take(5) {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Reads a section's contents: `(id, start, end)` of every section.
fn section_ranges(bytes: &[u8]) -> Option<Vec<(u8, usize, usize)>> {
    let mut at = 8;
    let mut ranges = Vec::new();
    while at < bytes.len() {
        let id = bytes[at];
        at += 1;
        let (size, read) = leb128(bytes.get(at..)?)?;
        at += read;
        let end = at.checked_add(size).filter(|end| *end <= bytes.len())?;
        ranges.push((id, at, end));
        at = end;
    }
    Some(ranges)
}

/// Every defined function's name (from the `name` section) and body size (from the
/// `code` section).
pub fn function_sizes(bytes: &[u8]) -> Option<Vec<(String, usize)>> {
    let ranges = section_ranges(bytes)?;
    // Imported functions come first in the function index space.
    let mut imported = 0usize;
    if let Some(&(_, start, end)) = ranges.iter().find(|(id, _, _)| *id == 2) {
        let mut at = start;
        let (count, read) = leb128(&bytes[at..end])?;
        at += read;
        for _ in 0..count {
            for _ in 0..2 {
                let (length, read) = leb128(&bytes[at..end])?;
                at += read + length;
            }
            let kind = *bytes.get(at)?;
            at += 1;
            match kind {
                0 => {
                    imported += 1;
                    at += leb128(&bytes[at..end])?.1;
                }
                1 => {
                    at += 1; // reference type
                    at += limits(&bytes[at..end])?;
                }
                2 => at += limits(&bytes[at..end])?,
                3 => at += 2, // value type, mutability
                _ => return None,
            }
        }
    }
    let &(_, code_start, code_end) = ranges.iter().find(|(id, _, _)| *id == 10)?;
    let mut sizes = Vec::new();
    let mut at = code_start;
    let (count, read) = leb128(&bytes[at..code_end])?;
    at += read;
    for _ in 0..count {
        let (size, read) = leb128(&bytes[at..code_end])?;
        sizes.push(size + read);
        at += read + size;
    }
    // The name section: subsection 1 holds the function names.
    let mut names = std::collections::HashMap::new();
    for &(id, start, end) in &ranges {
        if id != 0 {
            continue;
        }
        let (length, read) = leb128(&bytes[start..end])?;
        if bytes.get(start + read..start + read + length)? != b"name" {
            continue;
        }
        let mut at = start + read + length;
        while at < end {
            let kind = bytes[at];
            at += 1;
            let (size, read) = leb128(&bytes[at..end])?;
            at += read;
            let sub_end = at + size;
            if kind == 1 {
                let mut p = at;
                let (count, read) = leb128(&bytes[p..sub_end])?;
                p += read;
                for _ in 0..count {
                    let (index, read) = leb128(&bytes[p..sub_end])?;
                    p += read;
                    let (length, read) = leb128(&bytes[p..sub_end])?;
                    p += read;
                    let name = String::from_utf8_lossy(bytes.get(p..p + length)?).into_owned();
                    p += length;
                    names.insert(index, name);
                }
            }
            at = sub_end;
        }
    }
    if names.is_empty() {
        return None;
    }
    Some(
        sizes
            .into_iter()
            .enumerate()
            .map(|(i, size)| {
                let name = names
                    .get(&(imported + i))
                    .cloned()
                    .unwrap_or_else(|| format!("function {}", imported + i));
                (name, size)
            })
            .collect(),
    )
}

/// Length of a limits encoding.
fn limits(bytes: &[u8]) -> Option<usize> {
    let flag = *bytes.first()?;
    let mut at = 1 + leb128(bytes.get(1..)?)?.1;
    if flag & 1 == 1 {
        at += leb128(bytes.get(at..)?)?.1;
    }
    Some(at)
}

/// The crate a mangled Rust symbol (v0 `_R...` or legacy `_ZN...`) belongs to, e.g.
/// `serde_json`: the crate of the item's path, so a generic function instantiated for
/// another crate's types counts for the crate that defines it. Other names go to
/// `(other)`.
pub fn crate_of(symbol: &str) -> String {
    if symbol.starts_with("_R") {
        return v0_path(symbol)
            .and_then(|path| path.into_iter().next())
            .unwrap_or_else(|| "(other)".to_owned());
    }
    let path = readable(symbol);
    let path = path
        .trim_start_matches('<')
        .trim_start_matches('&')
        .trim_start_matches("mut ");
    match path.split_once("::") {
        Some((first, _))
            if !first.is_empty() && first.chars().all(|c| c.is_alphanumeric() || c == '_') =>
        {
            first.to_owned()
        }
        _ => "(other)".to_owned(),
    }
}

/// A mangled Rust symbol as a path (`tokengate::config::FilterConfig::parse`), best
/// effort, without generic arguments or hash; other names as they are.
pub fn readable(symbol: &str) -> String {
    if symbol.starts_with("_R") {
        return v0_path(symbol).map_or_else(|| symbol.to_owned(), |path| path.join("::"));
    }
    let Some(mut rest) = symbol.strip_prefix("_ZN") else {
        return symbol.to_owned();
    };
    let mut parts = Vec::new();
    while rest.starts_with(|c: char| c.is_ascii_digit()) {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        let Ok(length) = rest[..digits].parse::<usize>() else {
            break;
        };
        let Some(part) = rest.get(digits..digits + length) else {
            break;
        };
        parts.push(part);
        rest = &rest[digits + length..];
    }
    if parts
        .last()
        .is_some_and(|last| last.len() == 17 && last.starts_with('h'))
    {
        parts.pop();
    }
    parts
        .join("::")
        .replace("$LT$", "<")
        .replace("$GT$", ">")
        .replace("$u20$", " ")
        .replace("$RF$", "&")
        .replace("$C$", ",")
        .replace("..", "::")
        .trim_start_matches('_')
        .to_owned()
}

/// The path of a v0-mangled symbol (RFC 2603), enough of the grammar to name items:
/// crate roots, nested paths, inherent and trait impls, generic arguments (skipped)
/// and back-references.
fn v0_path(symbol: &str) -> Option<Vec<String>> {
    let bytes = symbol.strip_prefix("_R")?.as_bytes();
    let mut parser = V0 { bytes, depth: 0 };
    let mut at = 0;
    // An optional encoding version (decimal) comes first.
    while bytes.get(at).is_some_and(u8::is_ascii_digit) {
        at += 1;
    }
    parser.path(&mut at)
}

struct V0<'a> {
    bytes: &'a [u8],
    depth: usize,
}

impl V0<'_> {
    fn next(&self, at: &mut usize) -> Option<u8> {
        let byte = *self.bytes.get(*at)?;
        *at += 1;
        Some(byte)
    }

    /// `<base-62-number>`: digits then `_` (`_` alone is 0).
    fn base62(&self, at: &mut usize) -> Option<usize> {
        if self.bytes.get(*at) == Some(&b'_') {
            *at += 1;
            return Some(0);
        }
        let mut value = 0usize;
        loop {
            let byte = self.next(at)?;
            let digit = match byte {
                b'0'..=b'9' => byte - b'0',
                b'a'..=b'z' => byte - b'a' + 10,
                b'A'..=b'Z' => byte - b'A' + 36,
                b'_' => return value.checked_add(1),
                _ => return None,
            };
            value = value.checked_mul(62)?.checked_add(usize::from(digit))?;
        }
    }

    fn disambiguator(&self, at: &mut usize) -> Option<()> {
        if self.bytes.get(*at) == Some(&b's') {
            *at += 1;
            self.base62(at)?;
        }
        Some(())
    }

    fn identifier(&self, at: &mut usize) -> Option<String> {
        self.disambiguator(at)?;
        let punycode = self.bytes.get(*at) == Some(&b'u');
        if punycode {
            *at += 1;
        }
        let start = *at;
        while self.bytes.get(*at).is_some_and(u8::is_ascii_digit) {
            *at += 1;
        }
        let length: usize = std::str::from_utf8(&self.bytes[start..*at])
            .ok()?
            .parse()
            .ok()?;
        if self.bytes.get(*at) == Some(&b'_') {
            *at += 1;
        }
        let text = self.bytes.get(*at..*at + length)?;
        *at += length;
        Some(String::from_utf8_lossy(text).into_owned())
    }

    fn backref<T>(
        &mut self,
        at: &mut usize,
        parse: impl FnOnce(&mut Self, &mut usize) -> Option<T>,
    ) -> Option<T> {
        let target = self.base62(at)?;
        if self.depth > 64 || target >= *at {
            return None;
        }
        self.depth += 1;
        let mut there = target;
        let result = parse(self, &mut there);
        self.depth -= 1;
        result
    }

    fn path(&mut self, at: &mut usize) -> Option<Vec<String>> {
        match self.next(at)? {
            b'C' => Some(vec![self.identifier(at)?]),
            b'N' => {
                let namespace = self.next(at)?;
                let mut path = self.path(at)?;
                let name = self.identifier(at)?;
                match (namespace, name.is_empty()) {
                    (b'C', _) => path.push("{closure}".into()),
                    (_, true) => path.push("{shim}".into()),
                    _ => path.push(name),
                }
                Some(path)
            }
            b'M' => {
                self.disambiguator(at)?;
                let mut path = self.path(at)?;
                let ty = self.type_(at)?;
                path.push(ty.last().cloned().unwrap_or_default());
                Some(path)
            }
            b'X' => {
                self.disambiguator(at)?;
                let mut path = self.path(at)?;
                let ty = self.type_(at)?;
                let tr = self.path(at)?;
                path.push(format!(
                    "<{} as {}>",
                    ty.last().cloned().unwrap_or_default(),
                    tr.last().cloned().unwrap_or_default()
                ));
                Some(path)
            }
            b'Y' => {
                let mut ty = self.type_(at)?;
                let tr = self.path(at)?;
                let last = ty.pop().unwrap_or_default();
                ty.push(format!(
                    "<{last} as {}>",
                    tr.last().cloned().unwrap_or_default()
                ));
                Some(ty)
            }
            b'I' => {
                let path = self.path(at)?;
                while self.bytes.get(*at) != Some(&b'E') {
                    self.generic_arg(at)?;
                }
                *at += 1;
                Some(path)
            }
            b'B' => self.backref(at, Self::path),
            _ => None,
        }
    }

    fn generic_arg(&mut self, at: &mut usize) -> Option<()> {
        match self.bytes.get(*at)? {
            b'L' => {
                *at += 1;
                self.base62(at).map(|_| ())
            }
            b'K' => {
                *at += 1;
                self.constant(at)
            }
            _ => self.type_(at).map(|_| ()),
        }
    }

    fn constant(&mut self, at: &mut usize) -> Option<()> {
        match self.next(at)? {
            b'p' => Some(()),
            b'B' => self.backref(at, Self::constant),
            _ => {
                // A basic type, then hex digits (with an optional sign) up to `_`.
                if self.bytes.get(*at) == Some(&b'n') {
                    *at += 1;
                }
                while self.next(at)? != b'_' {}
                Some(())
            }
        }
    }

    fn type_(&mut self, at: &mut usize) -> Option<Vec<String>> {
        let tag = *self.bytes.get(*at)?;
        match tag {
            b'a'..=b'z' => {
                *at += 1;
                let name = match tag {
                    b'a' => "i8",
                    b'b' => "bool",
                    b'c' => "char",
                    b'd' => "f64",
                    b'e' => "str",
                    b'f' => "f32",
                    b'h' => "u8",
                    b'i' => "isize",
                    b'j' => "usize",
                    b'l' => "i32",
                    b'm' => "u32",
                    b'n' => "i128",
                    b'o' => "u128",
                    b's' => "i16",
                    b't' => "u16",
                    b'u' => "()",
                    b'v' => "...",
                    b'x' => "i64",
                    b'y' => "u64",
                    b'z' => "!",
                    _ => "_",
                };
                Some(vec![name.to_owned()])
            }
            b'R' | b'Q' => {
                *at += 1;
                if self.bytes.get(*at) == Some(&b'L') {
                    *at += 1;
                    self.base62(at)?;
                }
                self.type_(at)
            }
            b'P' | b'O' | b'S' => {
                *at += 1;
                self.type_(at)
            }
            b'A' => {
                *at += 1;
                let ty = self.type_(at)?;
                self.constant(at)?;
                Some(ty)
            }
            b'T' => {
                *at += 1;
                while self.bytes.get(*at) != Some(&b'E') {
                    self.type_(at)?;
                }
                *at += 1;
                Some(vec!["(tuple)".to_owned()])
            }
            b'B' => {
                *at += 1;
                self.backref(at, Self::type_)
            }
            b'C' | b'N' | b'M' | b'X' | b'Y' | b'I' => self.path(at),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_module_into_sections() {
        // magic, version, a type section of 4 bytes, a custom section "name" of 5 bytes.
        let mut module = b"\0asm\x01\0\0\0".to_vec();
        module.extend([1, 4, 1, 0x60, 0, 0]);
        module.extend([0, 5, 4, b'n', b'a', b'm', b'e']);
        let found = sections(&module).expect("parses");
        assert_eq!(
            found,
            vec![
                Section {
                    name: "type".into(),
                    bytes: 6
                },
                Section {
                    name: "custom:name".into(),
                    bytes: 7
                },
            ]
        );
        assert!(sections(b"nope").is_err());
        assert_eq!(leb128(&[0xe5, 0x8e, 0x26]), Some((624_485, 3)));
    }

    #[test]
    fn symbols_are_attributed_to_their_crate() {
        let symbol = "_ZN10serde_json2de21Deserializer$LT$R$GT$11parse_value17h0123456789abcdefE";
        assert_eq!(
            readable(symbol),
            "serde_json::de::Deserializer<R>::parse_value"
        );
        assert_eq!(crate_of(symbol), "serde_json");
        let impl_symbol = "_ZN63_$LT$tokengate_core..flow..FetchFlow$u20$as$u20$core..fmt..Debug$GT$3fmt17h0123456789abcdefE";
        assert_eq!(crate_of(impl_symbol), "tokengate_core");
        assert_eq!(crate_of("proxy_on_memory_allocate"), "(other)");
        // v0 mangling (what this toolchain emits).
        let v0 = "_RNvMs4_NtCs8coDpclnbJN_9tokengate6configNtB5_12FilterConfig5parse";
        assert_eq!(crate_of(v0), "tokengate");
        assert_eq!(readable(v0), "tokengate::config::FilterConfig::parse");
        let generic = "_RINvNtNtNtNtCsgPGlVSkxRGi_4core5slice4sort8unstable9quicksort9quicksortReNvYB17_NtNtBa_3cmp10PartialOrd2ltECscQSnhSNxLSp_14tokengate_core";
        assert_eq!(crate_of(generic), "core");
        assert_eq!(
            readable(generic),
            "core::slice::sort::unstable::quicksort::quicksort"
        );
        assert_eq!(crate_of("memcpy"), "(other)");
    }
}
