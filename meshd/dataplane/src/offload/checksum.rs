//! The Internet checksum (RFC 1071), in the big-endian domain packets use.
//! Sums are kept unfolded in a `u64` so ranges and pseudo-headers add up
//! without carries lost; only `fold` reduces them to 16 bits.

/// Adds `data`, as big-endian 16-bit words (an odd last byte padded with
/// zero), to `initial`. Ranges summed separately and added must each start
/// at an even offset of the whole they are part of.
pub fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

/// Reduces a sum to 16 bits with end-around carry.
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum to store: the complement of the folded sum.
pub fn checksum(data: &[u8], initial: u64) -> u16 {
    !fold(sum(data, initial))
}

/// The TCP/UDP pseudo-header sum: addresses, protocol, transport length.
pub fn pseudo_header(src: &[u8], dst: &[u8], protocol: u8, length: usize) -> u64 {
    sum(dst, sum(src, 0)) + u64::from(protocol) + length as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example_and_odd_lengths() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data, 0)), 0xddf2);
        assert_eq!(checksum(&data, 0), !0xddf2);
        // An odd byte is the high half of a zero-padded word.
        assert_eq!(fold(sum(&[0xab], 0)), 0xab00);
        assert_eq!(fold(sum(&[0x12, 0x34, 0x56], 0)), 0x1234 + 0x5600);
        // Split at an even offset, the parts add up to the whole.
        let whole: Vec<u8> = (0..=255u8).cycle().take(1001).collect();
        let (a, b) = whole.split_at(500);
        assert_eq!(fold(sum(b, sum(a, 0))), fold(sum(&whole, 0)));
    }

    #[test]
    fn a_packet_with_its_checksum_sums_to_all_ones() {
        // A real IPv4 header (checksum 0xb861 in bytes 10..12).
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(fold(sum(&header, 0)), 0xffff);
        let mut zeroed = header;
        zeroed[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(checksum(&zeroed, 0), 0xb861);
    }
}
