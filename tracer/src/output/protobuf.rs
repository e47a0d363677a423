//! Just enough of the protobuf wire format to write a message: varints and
//! length-delimited fields. Hand-written so that no protoc runs at build time.

/// One message's encoded fields, in the order they are added.
#[derive(Default)]
pub struct Message {
    buf: Vec<u8>,
}

const VARINT: u64 = 0;
const LENGTH_DELIMITED: u64 = 2;

impl Message {
    pub fn new() -> Self {
        Self::default()
    }

    /// A uint64 (or bool) field; zero is the default and is not written.
    pub fn uint(&mut self, field: u32, value: u64) -> &mut Self {
        if value != 0 {
            self.key(field, VARINT);
            varint(&mut self.buf, value);
        }
        self
    }

    /// An int64 field: negative numbers are their two's complement (ten bytes).
    pub fn int(&mut self, field: u32, value: i64) -> &mut Self {
        self.uint(field, value as u64)
    }

    /// Bytes or a string. Always written: in a repeated field an empty entry
    /// still counts (profile.proto's string table starts with "").
    pub fn bytes(&mut self, field: u32, value: &[u8]) -> &mut Self {
        self.key(field, LENGTH_DELIMITED);
        varint(&mut self.buf, value.len() as u64);
        self.buf.extend_from_slice(value);
        self
    }

    pub fn message(&mut self, field: u32, value: &Message) -> &mut Self {
        self.bytes(field, &value.buf)
    }

    /// A packed repeated varint field (proto3's default for repeated scalars).
    pub fn packed(&mut self, field: u32, values: impl IntoIterator<Item = u64>) -> &mut Self {
        let mut packed = Vec::new();
        for v in values {
            varint(&mut packed, v);
        }
        if !packed.is_empty() {
            self.bytes(field, &packed);
        }
        self
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    fn key(&mut self, field: u32, wire_type: u64) {
        varint(&mut self.buf, (u64::from(field) << 3) | wire_type);
    }
}

fn varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_the_protobuf_documentation() {
        // The examples of https://protobuf.dev/programming-guides/encoding/
        let mut m = Message::new();
        m.uint(1, 150);
        assert_eq!(m.into_bytes(), [0x08, 0x96, 0x01]);
        let mut m = Message::new();
        m.bytes(2, b"testing");
        assert_eq!(m.into_bytes(), b"\x12\x07testing");
        let mut m = Message::new();
        m.packed(4, [3, 270, 86942]);
        assert_eq!(
            m.into_bytes(),
            [0x22, 0x06, 0x03, 0x8e, 0x02, 0x9e, 0xa7, 0x05]
        );
        let mut inner = Message::new();
        inner.uint(1, 150);
        let mut m = Message::new();
        m.message(3, &inner);
        assert_eq!(m.into_bytes(), [0x1a, 0x03, 0x08, 0x96, 0x01]);
    }

    #[test]
    fn defaults_are_skipped_and_negatives_take_ten_bytes() {
        let mut m = Message::new();
        m.uint(1, 0).packed(2, []);
        assert!(m.into_bytes().is_empty());
        let mut m = Message::new();
        m.int(1, -1);
        assert_eq!(
            m.into_bytes(),
            [0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        );
        let mut m = Message::new();
        m.bytes(6, b"");
        assert_eq!(m.into_bytes(), [0x32, 0x00]);
    }
}
