//! Just enough Kubernetes protobuf decoding for `kubectl create namespace|configmap|secret`,
//! whose typed clients send protobuf bodies. Other kinds sent as protobuf get 415; every
//! response is JSON.

use serde_json::{Map, Value, json};

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn varint(&mut self) -> Option<u64> {
        let mut out = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos)?;
            self.pos += 1;
            out |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(out);
            }
        }
        None
    }

    fn next(&mut self) -> Option<Option<(u64, Field<'a>)>> {
        if self.pos >= self.buf.len() {
            return Some(None);
        }
        let key = self.varint()?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            2 => {
                let len = usize::try_from(self.varint()?).ok()?;
                let bytes = self.buf.get(self.pos..self.pos.checked_add(len)?)?;
                self.pos += len;
                Field::Bytes(bytes)
            }
            1 => {
                self.pos += 8;
                Field::Varint(0)
            }
            5 => {
                self.pos += 4;
                Field::Varint(0)
            }
            _ => return None,
        };
        Some(Some((key >> 3, field)))
    }

    fn fields(buf: &'a [u8]) -> Option<Vec<(u64, Field<'a>)>> {
        let mut r = Reader::new(buf);
        let mut out = Vec::new();
        while let Some((n, f)) = r.next()? {
            out.push((n, f));
        }
        Some(out)
    }
}

fn text(b: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(b).into_owned())
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A `map<string, string|bytes>` entry.
fn map_entry(b: &[u8], binary: bool) -> Option<(String, Value)> {
    let mut key = String::new();
    let mut value = Value::String(String::new());
    for (n, f) in Reader::fields(b)? {
        match (n, f) {
            (1, Field::Bytes(k)) => key = String::from_utf8_lossy(k).into_owned(),
            (2, Field::Bytes(v)) if binary => value = Value::String(base64(v)),
            (2, Field::Bytes(v)) => value = text(v),
            _ => {}
        }
    }
    Some((key, value))
}

fn insert_entry(
    target: &mut Map<String, Value>,
    field: &str,
    b: &[u8],
    binary: bool,
) -> Option<()> {
    let (k, v) = map_entry(b, binary)?;
    let slot = target.entry(field).or_insert_with(|| json!({}));
    slot.as_object_mut()?.insert(k, v);
    Some(())
}

fn object_meta(b: &[u8]) -> Option<Value> {
    let mut meta = Map::new();
    for (n, f) in Reader::fields(b)? {
        match (n, f) {
            (1, Field::Bytes(v)) => drop(meta.insert("name".into(), text(v))),
            (2, Field::Bytes(v)) => drop(meta.insert("generateName".into(), text(v))),
            (3, Field::Bytes(v)) => drop(meta.insert("namespace".into(), text(v))),
            (11, Field::Bytes(v)) => insert_entry(&mut meta, "labels", v, false)?,
            (12, Field::Bytes(v)) => insert_entry(&mut meta, "annotations", v, false)?,
            (14, Field::Bytes(v)) => {
                let list = meta.entry("finalizers").or_insert_with(|| json!([]));
                list.as_array_mut()?.push(text(v));
            }
            _ => {}
        }
    }
    Some(Value::Object(meta))
}

/// Decodes a `k8s\0`-prefixed protobuf body of a Namespace, ConfigMap or Secret into JSON.
pub fn decode(body: &[u8]) -> Option<Value> {
    let envelope = body.strip_prefix(b"k8s\x00")?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (n, f) in Reader::fields(envelope)? {
        match (n, f) {
            (1, Field::Bytes(tm)) => {
                for (m, g) in Reader::fields(tm)? {
                    match (m, g) {
                        (1, Field::Bytes(v)) => {
                            api_version = String::from_utf8_lossy(v).into_owned()
                        }
                        (2, Field::Bytes(v)) => kind = String::from_utf8_lossy(v).into_owned(),
                        _ => {}
                    }
                }
            }
            (2, Field::Bytes(r)) => raw = r,
            _ => {}
        }
    }
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), Value::String(api_version));
    obj.insert("kind".into(), Value::String(kind.clone()));
    for (n, f) in Reader::fields(raw)? {
        match (kind.as_str(), n, f) {
            (_, 1, Field::Bytes(m)) => drop(obj.insert("metadata".into(), object_meta(m)?)),
            ("Namespace", _, _) => {}
            ("ConfigMap", 2, Field::Bytes(e)) => insert_entry(&mut obj, "data", e, false)?,
            ("ConfigMap", 3, Field::Bytes(e)) => insert_entry(&mut obj, "binaryData", e, true)?,
            ("ConfigMap", 4, Field::Varint(v)) | ("Secret", 5, Field::Varint(v)) => {
                drop(obj.insert("immutable".into(), Value::Bool(v != 0)))
            }
            ("Secret", 2, Field::Bytes(e)) => insert_entry(&mut obj, "data", e, true)?,
            ("Secret", 3, Field::Bytes(t)) => drop(obj.insert("type".into(), text(t))),
            ("Secret", 4, Field::Bytes(e)) => insert_entry(&mut obj, "stringData", e, false)?,
            ("ConfigMap" | "Secret", _, _) => {}
            _ => return None,
        }
    }
    Some(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Base64 matches the standard alphabet with padding.
    #[test]
    fn base64_padding() {
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
    }
}
