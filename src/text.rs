//! Text that every request writes, without the formatting machinery: an IPv4 address in
//! dotted decimal, a port, a socket address. `format!` and `to_string` go through
//! `core::fmt` (about 1 600 instructions for one socket address); these write bytes.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// Appends an IPv4 address in dotted decimal.
pub fn dotted(ip: Ipv4Addr, out: &mut Vec<u8>) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        decimal(u16::from(octet), out);
    }
}

/// Appends `n` in decimal.
pub fn decimal(mut n: u16, out: &mut Vec<u8>) {
    let (mut digits, mut first) = ([0u8; 5], 5);
    loop {
        first -= 1;
        digits[first] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[first..]);
}

/// Appends an IPv4 socket address (`10.0.0.1:80`).
pub fn socket_addr_v4(addr: SocketAddrV4, out: &mut Vec<u8>) {
    dotted(*addr.ip(), out);
    out.push(b':');
    decimal(addr.port(), out);
}

/// A socket address as `Display` writes it (`10.0.0.1:80`, `[::1]:80`).
pub fn socket_addr(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => {
            let mut text = Vec::with_capacity(21);
            socket_addr_v4(a, &mut text);
            String::from_utf8(text).expect("digits, dots and a colon")
        }
        SocketAddr::V6(a) => a.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_as_the_formatter_writes_them() {
        for addr in [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.0.0.1:80",
            "172.17.100.9:8080",
            "1.20.199.250:5",
            "[::1]:7",
            "[fe80::1%2]:443",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(socket_addr(addr), addr.to_string());
        }
    }
}
