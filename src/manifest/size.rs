//! How the manifest writes sizes (`memory`, `shm`, `max_body`, ...): so that they read
//! back as the same number of bytes.
//!
//! `bytesize` prints one decimal (`"512.0 MiB"`), which is what revision ids have always
//! hashed and what is kept wherever it reads back exactly. Where it does not (`8GB` prints
//! as `"7.5 GiB"`, 49153 bytes as `"48.0 KiB"`), the store would hand back another size
//! after a restart and two manifests a few bytes apart would share a revision id; those
//! are written in SI units when that is exact (`"8.0 GB"`), else in bytes (`"49153 B"`).

use bytesize::ByteSize;
use serde::Serializer;

/// `serialize_with` for a size.
pub(super) fn serialize<S: Serializer>(size: &ByteSize, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&exact(*size))
}

/// `serialize_with` for an optional size.
pub(super) fn serialize_opt<S: Serializer>(
    size: &Option<ByteSize>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match size {
        Some(size) => s.serialize_some(&exact(*size)),
        None => s.serialize_none(),
    }
}

/// The shortest of Ember's spellings of `size` that parses back to it exactly.
fn exact(size: ByteSize) -> String {
    [size.to_string(), size.display().si().to_string()]
        .into_iter()
        .find(|text| text.parse::<ByteSize>() == Ok(size))
        .unwrap_or_else(|| format!("{} B", size.as_u64()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::test_support::toml;

    #[test]
    fn sizes_are_written_as_before_where_that_reads_back_exactly() {
        assert_eq!(exact(ByteSize::mib(512)), "512.0 MiB");
        assert_eq!(exact(ByteSize::b(5)), "5 B");
        assert_eq!(exact(ByteSize::gib(4) + ByteSize::mib(512)), "4.5 GiB");
    }

    #[test]
    fn sizes_that_print_rounded_are_written_exactly() {
        assert_eq!(exact(ByteSize::gb(8)), "8.0 GB");
        assert_eq!(exact(ByteSize::b(49153)), "49153 B");
        assert_eq!(exact(ByteSize::b(u64::MAX - 1)), "18446744073709551614 B");
    }

    /// Found by tests/fuzz_manifest.rs: `gpu.memory = 49153` came back from JSON as 49152.
    #[test]
    fn a_size_that_prints_rounded_reads_back_the_same_and_changes_the_revision() {
        let plain = "name = \"a\"\nimage = \"e:1\"\n[resources]\nmemory = ";
        let odd = toml(&format!("{plain}1000000001")).unwrap();
        let json = serde_json::to_string(&odd).unwrap();
        let back = crate::manifest::Manifest::parse(&json, crate::manifest::Format::Json);
        assert_eq!(back.unwrap(), odd, "{json}");
        let next = toml(&format!("{plain}1000000002")).unwrap();
        assert_ne!(odd.revision_id(), next.revision_id());
    }
}
