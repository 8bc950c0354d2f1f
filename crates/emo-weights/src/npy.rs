//! Minimal `.npy` (NumPy format 1.0-3.0) reading and writing for f32 arrays in C order.

use std::path::Path;

use crate::WeightsError;

/// An n-dimensional f32 array.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

fn bad(msg: impl Into<String>) -> WeightsError {
    WeightsError::Corrupt(format!("npy: {}", msg.into()))
}

fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let i = header.find(&format!("'{key}'"))?;
    let rest = header[i + key.len() + 2..].trim_start().strip_prefix(':')?.trim_start();
    Some(rest)
}

/// Parse `.npy` bytes. Accepts little-endian `<f4`, `<f8` (converted) and `|u1`; C order only.
pub fn parse(bytes: &[u8]) -> Result<Array, WeightsError> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not an .npy file (bad magic)"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
        v => return Err(bad(format!("unsupported version {v}"))),
    };
    let header = bytes.get(start..start + hlen).ok_or_else(|| bad("truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not text"))?;
    let descr = header_value(header, "descr").ok_or_else(|| bad("no descr"))?;
    let descr = descr.trim_start_matches('\'').split('\'').next().unwrap_or("");
    if header_value(header, "fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err(bad("Fortran-order arrays are not supported; save with np.ascontiguousarray"));
    }
    let shape_s = header_value(header, "shape").ok_or_else(|| bad("no shape"))?;
    let shape_s = shape_s.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or_else(|| bad("bad shape"))?;
    let shape = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad(format!("bad shape entry `{s}`"))))
        .collect::<Result<Vec<_>, _>>()?;
    let n: usize = shape.iter().product();
    let body = &bytes[start + hlen..];
    let data: Vec<f32> = match descr {
        "<f4" => {
            need(body, n * 4)?;
            body[..n * 4].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
        }
        "<f8" => {
            need(body, n * 8)?;
            body[..n * 8].chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect()
        }
        "|u1" => {
            need(body, n)?;
            body[..n].iter().map(|&b| b as f32).collect()
        }
        other => return Err(bad(format!("dtype {other} not supported (use float32)"))),
    };
    Ok(Array { shape, data })
}

fn need(body: &[u8], n: usize) -> Result<(), WeightsError> {
    if body.len() < n {
        return Err(bad(format!("truncated data: {} bytes, need {n}", body.len())));
    }
    Ok(())
}

/// Read an `.npy` file.
pub fn read(path: impl AsRef<Path>) -> Result<Array, WeightsError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| WeightsError::Io { path: path.to_path_buf(), source })?;
    parse(&bytes)
}

/// Encode an f32 array as `.npy` (version 1.0, `<f4`, C order).
pub fn encode(a: &Array) -> Vec<u8> {
    let shape = match a.shape.len() {
        1 => format!("({},)", a.shape[0]),
        _ => format!("({})", a.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    for v in &a.data {
        out.extend(v.to_le_bytes());
    }
    out
}

/// Write an `.npy` file atomically.
pub fn write(path: impl AsRef<Path>, a: &Array) -> Result<(), WeightsError> {
    crate::write_atomic(path.as_ref(), &encode(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let a = Array { shape: vec![2, 3], data: vec![1.0, -2.0, 3.5, 0.0, 1e-7, 9.0] };
        let b = encode(&a);
        assert_eq!(b.len() % 64, 24, "header padded to 64 bytes"); // 64-byte header + 24 data
        assert_eq!(parse(&b).unwrap(), a);
        assert!(parse(&b[..b.len() - 1]).is_err());
        assert!(parse(b"nonsense").is_err());
        let scalar = Array { shape: vec![3], data: vec![1.0, 2.0, 3.0] };
        assert_eq!(parse(&encode(&scalar)).unwrap(), scalar);
    }
}
