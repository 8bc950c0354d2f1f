//! Checkpoint I/O for EMO, framework-free and strict.
//!
//! * `.pth`: PyTorch zip checkpoints (`torch.save`, torch >= 1.6): a plain state dict, or a
//!   dict wrapping it under `net` or `net_E` (the EMA weights; preferred when both exist).
//!   Read with a small safe pickle decoder that executes nothing.
//! * `.safetensors`: read and written (atomically).
//!
//! [`validate`] checks a state dict against the official layout of a config and reports every
//! missing, unexpected or mis-shaped key by name in one error, and which variant the
//! checkpoint looks like when it is another one.

pub mod npy;
mod pickle;

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use emo_spec::{EmoConfig, KeyKind, KeySpec, Variant};

/// Errors of checkpoint I/O and validation.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("corrupt or truncated checkpoint: {0}")]
    Corrupt(String),
    #[error("unsupported checkpoint: {0}")]
    Unsupported(String),
    #[error("tensor `{key}` has dtype {dtype}, expected {expected}")]
    DType { key: String, dtype: String, expected: String },
    #[error("{0}")]
    Mismatch(Box<Mismatch>),
}

/// Element data of a stored tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// A named tensor of a checkpoint. Half, bfloat16 and double tensors are converted to f32 on
/// read; integer tensors are kept as i64.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor shape/data mismatch");
        Tensor { shape, data: Data::F32(data) }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn dtype_name(&self) -> &'static str {
        match self.data {
            Data::F32(_) => "f32",
            Data::I64(_) => "i64",
        }
    }
    /// The f32 values, or `None` for an integer tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            Data::I64(_) => None,
        }
    }
}

/// Where the state dict was found inside the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wrapping {
    /// The file is the state dict itself.
    Plain,
    /// Under the `net` key.
    Net,
    /// Under the `net_E` key (EMA weights).
    NetE,
    /// Under the `state_dict` key of an mmcv / mmdet / mmseg checkpoint (beside `meta` and
    /// `optimizer`, which are not read).
    Mmcv,
}

impl fmt::Display for Wrapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Wrapping::Plain => "plain state_dict",
            Wrapping::Net => "state_dict under `net`",
            Wrapping::NetE => "EMA state_dict under `net_E`",
            Wrapping::Mmcv => "mmcv checkpoint's `state_dict`",
        })
    }
}

/// An ordered map from official key names to tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct StateDict {
    pub tensors: BTreeMap<String, Tensor>,
    pub wrapping: Wrapping,
}

impl StateDict {
    pub fn new() -> Self {
        StateDict { tensors: BTreeMap::new(), wrapping: Wrapping::Plain }
    }
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.tensors.get(key)
    }
    pub fn insert(&mut self, key: impl Into<String>, t: Tensor) {
        self.tensors.insert(key.into(), t);
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

impl Default for StateDict {
    fn default() -> Self {
        Self::new()
    }
}

/// Load a checkpoint, choosing the reader from the file's content (zip = `.pth`, otherwise
/// safetensors).
///
/// Files are read tensor by tensor, so a checkpoint is in memory once (decoded), not twice.
pub fn load(path: impl AsRef<Path>) -> Result<StateDict, WeightsError> {
    let path = path.as_ref();
    let io = |source| WeightsError::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(io)?;
    f.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
    if n == 2 && &magic == b"PK" {
        load_pth_reader(std::io::BufReader::new(f))
    } else if n >= 1 && magic[0] == 0x80 {
        Err(WeightsError::Unsupported(
            "legacy (pre-1.6) PyTorch serialization; re-save it with torch.save(..., _use_new_zipfile_serialization=True)"
                .into(),
        ))
    } else {
        load_safetensors_file(f, path)
    }
}

/// Read a safetensors file tensor by tensor (header parsed here, each tensor's bytes read and
/// decoded in turn).
fn load_safetensors_file(mut f: std::fs::File, path: &Path) -> Result<StateDict, WeightsError> {
    let corrupt = |m: String| WeightsError::Corrupt(format!("not a readable safetensors file ({m})"));
    let io = |source| WeightsError::Io { path: path.to_path_buf(), source };
    let len = f.metadata().map_err(io)?.len();
    let mut n8 = [0u8; 8];
    f.read_exact(&mut n8).map_err(|e| corrupt(format!("header: {e}")))?;
    let n = u64::from_le_bytes(n8);
    if n > 100_000_000 || 8 + n > len {
        return Err(corrupt(format!("header length {n} for a {len}-byte file")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| corrupt(format!("header: {e}")))?;
    let json: serde_json::Value = serde_json::from_slice(&header).map_err(|e| corrupt(format!("header JSON: {e}")))?;
    let entries = json.as_object().ok_or_else(|| corrupt("header is not a JSON object".into()))?;
    let data_start = 8 + n;
    let mut sd = StateDict::new();
    for (name, info) in entries {
        if name == "__metadata__" {
            continue;
        }
        let bad = || corrupt(format!("bad header entry for `{name}`"));
        let dtype = info.get("dtype").and_then(|d| d.as_str()).ok_or_else(bad)?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(bad)?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        let offs = info.get("data_offsets").and_then(|o| o.as_array()).ok_or_else(bad)?;
        let (start, end) = match (offs.first().and_then(|v| v.as_u64()), offs.get(1).and_then(|v| v.as_u64())) {
            (Some(a), Some(b)) if a <= b => (a, b),
            _ => return Err(bad()),
        };
        if data_start + end > len {
            return Err(corrupt(format!("`{name}` points past the end of the file (truncated?)")));
        }
        let (kind, esize) = match dtype {
            "F32" => ("f32", 4),
            "F64" => ("f64", 8),
            "F16" => ("f16", 2),
            "BF16" => ("bf16", 2),
            "I64" => ("i64", 8),
            "I32" => ("i32", 4),
            other => {
                return Err(WeightsError::DType {
                    key: name.clone(),
                    dtype: other.into(),
                    expected: "a float type".into(),
                });
            }
        };
        let numel: usize = shape.iter().product();
        if (end - start) as usize != numel * esize {
            return Err(corrupt(format!("`{name}`: {} bytes for shape {shape:?} of {dtype}", end - start)));
        }
        let mut raw = vec![0u8; numel * esize];
        f.seek(std::io::SeekFrom::Start(data_start + start)).map_err(io)?;
        f.read_exact(&mut raw).map_err(|e| corrupt(format!("`{name}`: {e}")))?;
        sd.insert(name.clone(), Tensor { shape, data: decode_elems(kind, &raw, 0..numel) });
    }
    Ok(sd)
}

// ---------------------------------------------------------------------------------------------
// .pth

fn storage_elem(dtype: &str) -> Result<(usize, &'static str), WeightsError> {
    Ok(match dtype {
        "FloatStorage" => (4, "f32"),
        "DoubleStorage" => (8, "f64"),
        "HalfStorage" => (2, "f16"),
        "BFloat16Storage" => (2, "bf16"),
        "LongStorage" => (8, "i64"),
        "IntStorage" => (4, "i32"),
        other => return Err(WeightsError::Unsupported(format!("storage type {other}"))),
    })
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if man == 0 {
            sign
        } else {
            // subnormal: normalise
            let mut e = 127 - 15 + 1;
            let mut m = man;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((m & 0x3ff) << 13)
        }
    } else if exp == 31 {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 127 - 15) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

fn decode_elems(kind: &str, raw: &[u8], idx: impl Iterator<Item = usize>) -> Data {
    match kind {
        "f32" => Data::F32(idx.map(|i| f32::from_le_bytes(raw[4 * i..4 * i + 4].try_into().unwrap())).collect()),
        "f64" => Data::F32(idx.map(|i| f64::from_le_bytes(raw[8 * i..8 * i + 8].try_into().unwrap()) as f32).collect()),
        "f16" => Data::F32(idx.map(|i| f16_to_f32(u16::from_le_bytes([raw[2 * i], raw[2 * i + 1]]))).collect()),
        "bf16" => Data::F32(
            idx.map(|i| f32::from_bits((u16::from_le_bytes([raw[2 * i], raw[2 * i + 1]]) as u32) << 16)).collect(),
        ),
        "i64" => Data::I64(idx.map(|i| i64::from_le_bytes(raw[8 * i..8 * i + 8].try_into().unwrap())).collect()),
        _ => Data::I64(idx.map(|i| i32::from_le_bytes(raw[4 * i..4 * i + 4].try_into().unwrap()) as i64).collect()),
    }
}

/// Element indices (into the storage) of a strided view, in row-major order.
fn strided_indices(offset: usize, shape: &[usize], stride: &[usize]) -> Vec<usize> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        out.push(offset + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>());
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Read a `.pth` (PyTorch zip) checkpoint from memory.
pub fn load_pth_bytes(bytes: &[u8]) -> Result<StateDict, WeightsError> {
    load_pth_reader(std::io::Cursor::new(bytes))
}

/// Read a `.pth` (PyTorch zip) checkpoint, one storage at a time.
pub fn load_pth_reader<R: Read + std::io::Seek>(reader: R) -> Result<StateDict, WeightsError> {
    let corrupt = |e: zip::result::ZipError| WeightsError::Corrupt(format!("not a readable zip archive ({e})"));
    let mut zip = zip::ZipArchive::new(reader).map_err(corrupt)?;
    let names: Vec<String> =
        zip.file_names().map(|n| n.map(String::from)).collect::<Result<_, _>>().map_err(corrupt)?;
    let pkl = names
        .iter()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
        .cloned()
        .ok_or_else(|| WeightsError::Corrupt("zip has no data.pkl: not a PyTorch checkpoint".into()))?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let mut read = |name: &str| -> Result<Vec<u8>, WeightsError> {
        let mut f = zip.by_name(name).map_err(|e| WeightsError::Corrupt(format!("{name}: {e}")))?;
        let mut v = Vec::new();
        f.read_to_end(&mut v).map_err(|e| WeightsError::Corrupt(format!("{name}: {e}")))?;
        Ok(v)
    };
    let root = pickle::load(&read(&pkl)?)?;

    let Value::Dict(top) = root else {
        return Err(WeightsError::Unsupported(format!(
            "the pickle holds a {}, not a state_dict (save model.state_dict() instead of the model)",
            root.type_name()
        )));
    };
    let key_of = |k: &Value| match k {
        Value::Str(s) => Some(s.clone()),
        _ => None,
    };
    // Unwrap `net_E` (EMA, preferred) or `net` (the official classification checkpoints), or
    // mmcv's `state_dict` (the official detection / segmentation ones).
    let (entries, wrapping) = {
        let find = |name: &str| top.iter().find(|(k, _)| key_of(k).as_deref() == Some(name)).map(|(_, v)| v.clone());
        let has_tensors = top.iter().any(|(_, v)| matches!(v, Value::Tensor { .. }));
        match (has_tensors, find("net_E"), find("net"), find("state_dict")) {
            (false, Some(Value::Dict(d)), _, _) => (d, Wrapping::NetE),
            (false, _, Some(Value::Dict(d)), _) => (d, Wrapping::Net),
            (false, _, _, Some(Value::Dict(d))) => (d, Wrapping::Mmcv),
            _ => (top, Wrapping::Plain),
        }
    };

    // Only the storage of the current tensor is held (state dicts rarely share storages).
    let mut cached: Option<(String, Vec<u8>)> = None;
    let mut sd = StateDict { tensors: BTreeMap::new(), wrapping };
    let mut non_tensors = Vec::new();
    for (k, v) in entries {
        let Some(key) = key_of(&k) else {
            return Err(WeightsError::Corrupt("state_dict key is not a string".into()));
        };
        let Value::Tensor { storage, offset, shape, stride } = v else {
            non_tensors.push(format!("{key} ({})", v.type_name()));
            continue;
        };
        let Value::Storage { dtype, key: skey, numel } = *storage else { unreachable!() };
        let (esize, kind) = storage_elem(&dtype)?;
        if cached.as_ref().is_none_or(|(k, _)| *k != skey) {
            cached = Some((skey.clone(), read(&format!("{prefix}data/{skey}"))?));
        }
        let raw = &cached.as_ref().expect("storage just read").1;
        if raw.len() < numel * esize {
            return Err(WeightsError::Corrupt(format!(
                "storage of `{key}` holds {} bytes, needs {}",
                raw.len(),
                numel * esize
            )));
        }
        if shape.len() != stride.len() {
            return Err(WeightsError::Corrupt(format!("`{key}`: size and stride ranks differ")));
        }
        let idx = strided_indices(offset, &shape, &stride);
        if idx.iter().any(|&i| i >= numel) {
            return Err(WeightsError::Corrupt(format!("`{key}` points outside its storage")));
        }
        sd.tensors.insert(key, Tensor { shape, data: decode_elems(kind, raw, idx.into_iter()) });
    }
    if sd.tensors.is_empty() {
        return Err(WeightsError::Unsupported(if non_tensors.is_empty() {
            "the checkpoint holds no tensors".into()
        } else {
            format!("the checkpoint holds no tensors (entries: {})", non_tensors.join(", "))
        }));
    }
    if !non_tensors.is_empty() {
        return Err(WeightsError::Unsupported(format!(
            "the state_dict has non-tensor entries: {}",
            non_tensors.join(", ")
        )));
    }
    Ok(sd)
}

use pickle::Value;

// ---------------------------------------------------------------------------------------------
// .safetensors

/// Read a safetensors checkpoint from memory.
pub fn load_safetensors_bytes(bytes: &[u8]) -> Result<StateDict, WeightsError> {
    use safetensors::Dtype;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| WeightsError::Corrupt(format!("not a readable safetensors file ({e})")))?;
    let mut sd = StateDict::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let raw = view.data();
        let n: usize = shape.iter().product();
        let kind = match view.dtype() {
            Dtype::F32 => "f32",
            Dtype::F64 => "f64",
            Dtype::F16 => "f16",
            Dtype::BF16 => "bf16",
            Dtype::I64 => "i64",
            Dtype::I32 => "i32",
            other => {
                return Err(WeightsError::DType {
                    key: name,
                    dtype: format!("{other:?}"),
                    expected: "a float type".into(),
                });
            }
        };
        sd.tensors.insert(name, Tensor { shape, data: decode_elems(kind, raw, 0..n) });
    }
    Ok(sd)
}

/// Serialise a state dict to safetensors bytes (f32 and i64, keys sorted).
pub fn safetensors_bytes(sd: &StateDict) -> Result<Vec<u8>, WeightsError> {
    use safetensors::{Dtype, tensor::TensorView};
    let raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = sd
        .tensors
        .iter()
        .map(|(k, t)| {
            let (dt, bytes) = match &t.data {
                Data::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                Data::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            };
            (k.clone(), dt, t.shape.clone(), bytes)
        })
        .collect();
    let views = raw
        .iter()
        .map(|(k, dt, s, b)| {
            TensorView::new(*dt, s.clone(), b).map(|v| (k.clone(), v)).map_err(|e| WeightsError::Corrupt(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(|e| WeightsError::Corrupt(e.to_string()))
}

/// Write `bytes` to `path` atomically: a temporary file in the same folder, fsync, rename.
/// A failure (e.g. a full disk) leaves any previous file at `path` untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WeightsError> {
    let werr = |source| WeightsError::Write { path: path.to_path_buf(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(werr(e));
    }
    Ok(())
}

/// Save a state dict as safetensors, atomically.
pub fn save_safetensors(sd: &StateDict, path: impl AsRef<Path>) -> Result<(), WeightsError> {
    write_atomic(path.as_ref(), &safetensors_bytes(sd)?)
}

// ---------------------------------------------------------------------------------------------
// validation

/// Everything that is wrong with a checkpoint for a given config.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mismatch {
    /// The config's name (`emo-1m`, ...).
    pub expected: String,
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    /// (key, shape in the file, expected shape)
    pub shapes: Vec<(String, Vec<usize>, Vec<usize>)>,
    pub dtypes: Vec<(String, String)>,
    /// The variant whose layout the checkpoint matches, if another one does.
    pub looks_like: Option<Variant>,
    /// The checkpoint matches this variant with another number of classes.
    pub num_classes_in_file: Option<usize>,
}

fn list(keys: &[String]) -> String {
    const MAX: usize = 12;
    let mut s = keys.iter().take(MAX).cloned().collect::<Vec<_>>().join(", ");
    if keys.len() > MAX {
        s.push_str(&format!(", ... ({} more)", keys.len() - MAX));
    }
    s
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "checkpoint does not fit {}", self.expected)?;
        if let Some(v) = self.looks_like {
            write!(f, ": it looks like a {v} checkpoint (use --variant {v})")?;
        } else if let Some(n) = self.num_classes_in_file {
            write!(f, ": its head has {n} classes (set num_classes to {n})")?;
        }
        if !self.missing.is_empty() {
            write!(f, "\n  missing keys ({}): {}", self.missing.len(), list(&self.missing))?;
        }
        if !self.unexpected.is_empty() {
            write!(f, "\n  unexpected keys ({}): {}", self.unexpected.len(), list(&self.unexpected))?;
        }
        for (k, got, want) in self.shapes.iter().take(12) {
            write!(f, "\n  shape mismatch: {k} is {got:?} in the file, expected {want:?}")?;
        }
        if self.shapes.len() > 12 {
            write!(f, "\n  ... ({} more shape mismatches)", self.shapes.len() - 12)?;
        }
        for (k, dt) in &self.dtypes {
            write!(f, "\n  wrong dtype: {k} is {dt}")?;
        }
        Ok(())
    }
}

fn check(sd: &StateDict, cfg: &EmoConfig) -> Mismatch {
    check_keys(sd, &cfg.state_dict_keys(), cfg.name())
}

fn check_keys(sd: &StateDict, expected: &[KeySpec], name: &str) -> Mismatch {
    let mut m = Mismatch { expected: name.to_string(), ..Default::default() };
    for k in expected {
        match sd.get(&k.name) {
            None if k.kind == KeyKind::Counter => {}
            None => m.missing.push(k.name.clone()),
            Some(t) => {
                if t.shape != k.shape && !(k.kind == KeyKind::Counter && t.numel() == 1) {
                    m.shapes.push((k.name.clone(), t.shape.clone(), k.shape.clone()));
                }
                let want_float = k.kind != KeyKind::Counter;
                if want_float != matches!(t.data, Data::F32(_)) {
                    m.dtypes.push((k.name.clone(), t.dtype_name().into()));
                }
            }
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|k| k.name.as_str()).collect();
    m.unexpected = sd.tensors.keys().filter(|k| !known.contains(k.as_str())).cloned().collect();
    m
}

impl Mismatch {
    fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.shapes.is_empty() && self.dtypes.is_empty()
    }
}

/// Check `sd` against the official layout of `cfg`, strictly. `num_batches_tracked` may be
/// absent; everything else must be there, with the right shape and dtype, and nothing else.
pub fn validate(sd: &StateDict, cfg: &EmoConfig) -> Result<(), WeightsError> {
    let mut m = check(sd, cfg);
    if m.is_ok() {
        return Ok(());
    }
    // Same variant, other head width?
    if let Some(h) = sd.get("head.bias").filter(|t| t.shape.len() == 1) {
        let n = h.shape[0];
        if n != cfg.num_classes && check(sd, &cfg.clone().with_num_classes(n)).is_ok() {
            m.num_classes_in_file = Some(n);
        }
    }
    // Another variant?
    if m.num_classes_in_file.is_none() {
        for v in Variant::ALL {
            if Some(v) == cfg.variant {
                continue;
            }
            let mut c = v.config();
            c.num_classes = sd.get("head.bias").map(|t| t.shape[0]).unwrap_or(0);
            c.stages.iter_mut().zip(&cfg.stages).for_each(|(a, b)| a.window_size = b.window_size);
            if check(sd, &c).is_ok() {
                m.looks_like = Some(v);
                break;
            }
        }
    }
    Err(WeightsError::Mismatch(Box::new(m)))
}

/// Check `sd` strictly against any expected key list (e.g. a detector's
/// `DenseConfig::state_dict_keys`); `what` names the model in the error.
pub fn validate_keys(sd: &StateDict, expected: &[KeySpec], what: &str) -> Result<(), WeightsError> {
    let m = check_keys(sd, expected, what);
    if m.is_ok() { Ok(()) } else { Err(WeightsError::Mismatch(Box::new(m))) }
}

/// A dense model's state dict (`backbone.*` + neck / head keys) checked strictly against
/// `cfg`'s layout, and its backbone part with the `backbone.` prefix stripped.
pub fn dense_backbone(sd: &StateDict, cfg: &emo_spec::DenseConfig) -> Result<StateDict, WeightsError> {
    validate_keys(sd, &cfg.state_dict_keys(), &format!("{} on {}", cfg.task, cfg.backbone.name()))?;
    Ok(backbone_part(sd))
}

/// The `backbone.*` entries of a dense model's state dict, the prefix stripped.
pub fn backbone_part(sd: &StateDict) -> StateDict {
    let mut bb = StateDict::new();
    for (k, t) in &sd.tensors {
        if let Some(rest) = k.strip_prefix("backbone.") {
            bb.insert(rest, t.clone());
        }
    }
    bb
}

/// Guess the variant of a checkpoint from its layout (any head width, or none).
pub fn detect_variant(sd: &StateDict) -> Option<Variant> {
    let n = sd.get("head.bias").map(|t| t.shape[0]).unwrap_or(0);
    Variant::ALL.into_iter().find(|v| check(sd, &v.config().with_num_classes(n)).is_ok())
}

/// Keep only the backbone keys (drop the classifier's `norm.*` and `head.*`), as the official
/// detection / segmentation backbones do when they load a classification checkpoint.
pub fn backbone_only(mut sd: StateDict) -> StateDict {
    sd.tensors.retain(|k, _| !(k.starts_with("norm.") || k.starts_with("head.")));
    sd
}

/// A deterministic synthetic state dict with the official layout of `cfg` (for benchmarks and
/// tests where the values do not matter): weights in [-0.1, 0.1), BN variances in [0.5, 1.5).
pub fn synthetic(cfg: &EmoConfig, seed: u64) -> StateDict {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut sd = StateDict::new();
    for k in cfg.state_dict_keys() {
        let n: usize = k.shape.iter().product();
        let t = match k.kind {
            KeyKind::Counter => Tensor { shape: k.shape.clone(), data: Data::I64(vec![0]) },
            _ if k.name.ends_with("running_var") => {
                Tensor::f32(k.shape.clone(), (0..n).map(|_| 0.5 + next()).collect())
            }
            _ => Tensor::f32(k.shape.clone(), (0..n).map(|_| (next() - 0.5) * 0.2).collect()),
        };
        sd.insert(k.name, t);
    }
    sd
}
