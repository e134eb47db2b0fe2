//! Image references as Docker reads them: `[registry[:port]/]path[:tag][@digest]`, the
//! path's components lower case (`a-z`, `0-9`, separated by `.`, `_`, `__` or dashes).
//! Checking them here turns what the engine would refuse at the first start, or as a 503
//! from a node, into a clear error naming the field.

/// Longest reference accepted (Docker's name limit, with room for a tag and a digest).
pub const MAX_IMAGE_REF_LEN: usize = 512;

/// Whether `image` is a reference Docker accepts.
pub fn valid_image_ref(image: &str) -> bool {
    if image.is_empty() || image.len() > MAX_IMAGE_REF_LEN {
        return false;
    }
    let (name_tag, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let Some((algo, hex)) = d.split_once(':') else {
            return false;
        };
        let algo_ok = !algo.is_empty()
            && algo
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c));
        if !algo_ok || hex.len() < 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return false;
        }
    }
    // A tag is after the last `:` that follows the last `/` (a registry's port is not).
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        let ok = (1..=128).contains(&tag.len())
            && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return false;
        }
    }
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    let first = parts[0];
    let is_registry = parts.len() > 1
        && (first.contains('.') || first.contains(':') || first == "localhost")
        || first.chars().any(|c| c.is_ascii_uppercase()) && parts.len() > 1;
    if is_registry {
        if !valid_registry(first) {
            return false;
        }
        parts.remove(0);
    }
    !parts.is_empty() && parts.iter().all(|p| valid_component(p))
}

/// `host[:port]`: letters, digits, dots and dashes (or a bracketed IPv6 address).
fn valid_registry(host: &str) -> bool {
    let (host, port) = match host.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, Some(p)),
        _ => (host, None),
    };
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && !host.starts_with(['-', '.'])
            && !host.ends_with(['-', '.'])
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    };
    host_ok && port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok())
}

/// A path component: `[a-z0-9]+` runs joined by `.`, `_`, `__` or one or more `-`.
fn valid_component(part: &str) -> bool {
    let bytes = part.as_bytes();
    if bytes.is_empty() || !is_alnum(bytes[0]) || !is_alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if is_alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !is_alnum(bytes[i]) {
            i += 1;
        }
        let sep = &part[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-')) {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::valid_image_ref;

    #[test]
    fn references_docker_accepts_and_refuses() {
        for ok in [
            "x:1",
            "e:1",
            "busybox",
            "ember-test/echo:c0afcc0f9130",
            "127.0.0.1:5000/team/model:v1",
            "localhost:5000/a",
            "registry.example.com/a/b_c__d---e.f:1.0-rc_1",
            "ghcr.io/org/img@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "[::1]:5000/x:y",
        ] {
            assert!(valid_image_ref(ok), "{ok}");
        }
        for bad in [
            "",
            "Upper/Case",
            "UPPER",
            "a b",
            "-a",
            ":tag",
            "/a",
            "a/",
            "a//b",
            "a:",
            "a:-x",
            "a@sha256:xyz",
            "a.-b",
            "\u{17}\u{1}ß",
            "127.0.0.1:99999/a",
            "a:b:c",
        ] {
            assert!(!valid_image_ref(bad), "{bad:?}");
        }
    }
}
