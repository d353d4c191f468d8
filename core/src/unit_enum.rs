//! Deserialising enums of unit variants written as strings (`"inject"`), with one
//! shared body instead of serde's derived one per enum.
//!
//! [`deserialize_unit_enum!`](crate::deserialize_unit_enum) reads exactly what
//! `#[derive(Deserialize)]` on such an enum reads, with the same messages (`unknown
//! variant `x`, expected `a` or `b``): it drives the same `deserialize_enum` call. The
//! derived code is instantiated once per enum, about 1.2 KB each in the wasm module;
//! this is instantiated once per deserialiser.

use serde::de::{self, DeserializeSeed, EnumAccess, VariantAccess, Visitor};
use std::fmt;

/// Reads a unit variant of the enum `name`, whose variants are `variants` in
/// declaration order: the index of the one read.
pub fn deserialize_variant_index<'de, D: de::Deserializer<'de>>(
    deserializer: D,
    name: &'static str,
    variants: &'static [&'static str],
) -> Result<usize, D::Error> {
    deserializer.deserialize_enum(name, variants, UnitEnumVisitor { name, variants })
}

struct UnitEnumVisitor {
    name: &'static str,
    variants: &'static [&'static str],
}

impl<'de> Visitor<'de> for UnitEnumVisitor {
    type Value = usize;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "enum {}", self.name)
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<usize, A::Error> {
        let (index, variant) = data.variant_seed(VariantName(self.variants))?;
        variant.unit_variant()?;
        Ok(index)
    }
}

/// The variant's name, as its index in the given list.
struct VariantName(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for VariantName {
    type Value = usize;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl Visitor<'_> for VariantName {
    type Value = usize;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("variant identifier")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<usize, E> {
        self.0
            .iter()
            .position(|variant| *variant == value)
            .ok_or_else(|| E::unknown_variant(value, self.0))
    }
}

/// `impl Deserialize` for an enum of unit variants, each read from its string:
/// `deserialize_unit_enum!(Mode { "inject" => Inject, "endpoint" => Endpoint });`
#[macro_export]
macro_rules! deserialize_unit_enum {
    ($enum:ident { $($name:literal => $variant:ident),+ $(,)? }) => {
        impl<'de> ::serde::Deserialize<'de> for $enum {
            fn deserialize<D: ::serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                const VARIANTS: &[&str] = &[$($name),+];
                let index = $crate::unit_enum::deserialize_variant_index(
                    deserializer,
                    stringify!($enum),
                    VARIANTS,
                )?;
                [$(Self::$variant),+]
                    .into_iter()
                    .nth(index)
                    .ok_or_else(|| <D::Error as ::serde::de::Error>::unknown_variant("", VARIANTS))
            }
        }
    };
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    enum Derived {
        Hit,
        Fetch,
    }

    #[derive(Debug, PartialEq)]
    enum Shared {
        Hit,
        Fetch,
    }
    crate::deserialize_unit_enum!(Shared { "hit" => Hit, "fetch" => Fetch });

    /// The outcome of reading `json` as `{"v": <json>}`, as a comparable string.
    fn read<T: serde::de::DeserializeOwned + std::fmt::Debug>(json: &str) -> String {
        #[derive(serde::Deserialize)]
        struct Wrapper<T> {
            #[allow(dead_code)]
            v: T,
        }
        match serde_json::from_str::<Wrapper<T>>(&format!("{{\"v\": {json}}}")) {
            Ok(wrapper) => format!("{:?}", wrapper.v),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn reads_and_refuses_what_the_derived_code_does() {
        for json in [
            r#""hit""#,
            r#""fetch""#,
            r#""Hit""#,
            r#""h\u0069t""#,
            r#""""#,
            r#"{"fetch": null}"#,
            r#"{"fetch": 1}"#,
            r#"{"nope": null}"#,
            r#"{}"#,
            "[]",
            "1",
            "null",
            "true",
            r#""hit"#,
        ] {
            assert_eq!(read::<Shared>(json), read::<Derived>(json), "{json}");
        }
        assert_eq!(
            read::<Shared>(r#""x""#),
            "unknown variant `x`, expected `hit` or `fetch` at line 1 column 9"
        );
    }
}
