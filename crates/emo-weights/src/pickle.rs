//! A small, safe reader for the pickles inside PyTorch zip checkpoints (`torch.save`, format of
//! torch >= 1.6). Nothing is executed: only the handful of globals a state dict uses are
//! understood (`OrderedDict`, `_rebuild_tensor_v2`, `_rebuild_parameter`, storage types);
//! anything else becomes an opaque [`Value::Object`] that the caller can report by name.

use std::collections::HashMap;

use crate::WeightsError;

/// A decoded pickle value.
#[derive(Clone, Debug)]
#[allow(dead_code)] // payloads are kept for Debug output
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Insertion-ordered dict.
    Dict(Vec<(Value, Value)>),
    /// `module.name` of a global reference.
    Global(String),
    /// A storage reference from a persistent id: (dtype name, archive key, numel).
    Storage {
        dtype: String,
        key: String,
        numel: usize,
    },
    /// A tensor view into a storage.
    Tensor {
        storage: Box<Value>,
        offset: usize,
        shape: Vec<usize>,
        stride: Vec<usize>,
    },
    /// An object of a class we do not interpret (e.g. a pickled nn.Module).
    Object(String),
    /// Internal: the MARK sentinel.
    Mark,
}

impl Value {
    pub fn type_name(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::List(_) => "list".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::Dict(_) => "dict".into(),
            Value::Global(g) => format!("global {g}"),
            Value::Storage { .. } => "storage".into(),
            Value::Tensor { .. } => "tensor".into(),
            Value::Object(c) => format!("object of class {c}"),
            Value::Mark => "mark".into(),
        }
    }
}

fn err(msg: impl Into<String>) -> WeightsError {
    WeightsError::Corrupt(format!("pickle: {}", msg.into()))
}

struct Reader<'a> {
    b: &'a [u8],
    p: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WeightsError> {
        if self.p + n > self.b.len() {
            return Err(err("unexpected end of data"));
        }
        let s = &self.b[self.p..self.p + n];
        self.p += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WeightsError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WeightsError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, WeightsError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<String, WeightsError> {
        let start = self.p;
        while self.p < self.b.len() && self.b[self.p] != b'\n' {
            self.p += 1;
        }
        if self.p >= self.b.len() {
            return Err(err("unterminated line"));
        }
        let s = String::from_utf8_lossy(&self.b[start..self.p]).into_owned();
        self.p += 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> Result<String, WeightsError> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| err("invalid utf-8 string"))
    }
}

fn as_usize(v: &Value, what: &str) -> Result<usize, WeightsError> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        other => Err(err(format!("{what}: expected a non-negative int, got {}", other.type_name()))),
    }
}

fn as_usizes(v: &Value, what: &str) -> Result<Vec<usize>, WeightsError> {
    match v {
        Value::Tuple(xs) | Value::List(xs) => xs.iter().map(|x| as_usize(x, what)).collect(),
        other => Err(err(format!("{what}: expected a tuple, got {}", other.type_name()))),
    }
}

/// Apply a callable (a global) to its arguments, for the few callables a state dict uses.
fn reduce(func: Value, args: Value) -> Result<Value, WeightsError> {
    let name = match &func {
        Value::Global(g) => g.clone(),
        other => return Err(err(format!("REDUCE on {}", other.type_name()))),
    };
    let args = match args {
        Value::Tuple(a) => a,
        other => {
            return Err(err(format!("REDUCE args must be a tuple, got {}", other.type_name())));
        }
    };
    match name.as_str() {
        "collections.OrderedDict" | "builtins.dict" => Ok(Value::Dict(Vec::new())),
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
            if args.len() < 4 {
                return Err(err("_rebuild_tensor: too few arguments"));
            }
            if !matches!(args[0], Value::Storage { .. }) {
                return Err(err("_rebuild_tensor: first argument is not a storage"));
            }
            Ok(Value::Tensor {
                storage: Box::new(args[0].clone()),
                offset: as_usize(&args[1], "storage offset")?,
                shape: as_usizes(&args[2], "tensor size")?,
                stride: as_usizes(&args[3], "tensor stride")?,
            })
        }
        "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
            args.into_iter().next().ok_or_else(|| err("_rebuild_parameter without tensor"))
        }
        _ => Ok(Value::Object(name)),
    }
}

/// Decode a pickle. `persistent_load` turns a persistent id into a value (storages).
pub fn load(data: &[u8]) -> Result<Value, WeightsError> {
    let mut r = Reader { b: data, p: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let pop = |stack: &mut Vec<Value>| stack.pop().ok_or_else(|| err("stack underflow"));
    let pop_mark = |stack: &mut Vec<Value>| -> Result<Vec<Value>, WeightsError> {
        let pos = stack.iter().rposition(|v| matches!(v, Value::Mark)).ok_or_else(|| err("missing MARK"))?;
        let items = stack.split_off(pos + 1);
        stack.pop();
        Ok(items)
    };
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?; // PROTO
            }
            0x95 => {
                r.take(8)?; // FRAME
            }
            b'.' => return pop(&mut stack), // STOP
            b'(' => stack.push(Value::Mark),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'J' => {
                let v = i32::from_le_bytes(r.take(4)?.try_into().unwrap());
                stack.push(Value::Int(v as i64))
            }
            b'K' => {
                let v = r.u8()?;
                stack.push(Value::Int(v as i64))
            }
            b'M' => {
                let v = r.u16()?;
                stack.push(Value::Int(v as i64))
            }
            0x8a => {
                // LONG1
                let n = r.u8()? as usize;
                let bytes = r.take(n)?;
                if n > 8 {
                    return Err(err("LONG1 wider than 64 bits"));
                }
                let mut buf = if bytes.last().is_some_and(|b| b & 0x80 != 0) { [0xffu8; 8] } else { [0u8; 8] };
                buf[..n].copy_from_slice(bytes);
                stack.push(Value::Int(i64::from_le_bytes(buf)))
            }
            b'G' => {
                let v = f64::from_be_bytes(r.take(8)?.try_into().unwrap());
                stack.push(Value::Float(v))
            }
            b'X' => {
                let n = r.u32()? as usize;
                let s = r.string(n)?;
                stack.push(Value::Str(s))
            }
            0x8c => {
                let n = r.u8()? as usize;
                let s = r.string(n)?;
                stack.push(Value::Str(s))
            }
            b'U' => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(String::from_utf8_lossy(r.take(n)?).into_owned()))
            }
            b'T' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(String::from_utf8_lossy(r.take(n)?).into_owned()))
            }
            b'B' => {
                let n = r.u32()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()))
            }
            b'C' => {
                let n = r.u8()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()))
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Value::Global(format!("{module}.{name}")))
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(format!("{m}.{n}"))),
                    _ => return Err(err("STACK_GLOBAL needs two strings")),
                }
            }
            b'q' => {
                let i = r.u8()? as u32;
                memo.insert(i, stack.last().cloned().ok_or_else(|| err("BINPUT on empty stack"))?);
            }
            b'r' => {
                let i = r.u32()?;
                memo.insert(i, stack.last().cloned().ok_or_else(|| err("LONG_BINPUT on empty stack"))?);
            }
            0x94 => {
                let i = memo.len() as u32;
                memo.insert(i, stack.last().cloned().ok_or_else(|| err("MEMOIZE on empty stack"))?);
            }
            b'h' => {
                let i = r.u8()? as u32;
                stack.push(memo.get(&i).cloned().ok_or_else(|| err(format!("BINGET {i} not in memo")))?)
            }
            b'j' => {
                let i = r.u32()?;
                stack.push(memo.get(&i).cloned().ok_or_else(|| err(format!("LONG_BINGET {i} not in memo")))?)
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(err("TUPLEn: stack underflow"));
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items))
            }
            b'l' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::List(items))
            }
            b'd' => {
                let items = pop_mark(&mut stack)?;
                let mut d = Vec::new();
                for kv in items.chunks(2) {
                    if kv.len() == 2 {
                        d.push((kv[0].clone(), kv[1].clone()));
                    }
                }
                stack.push(Value::Dict(d))
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.push(v),
                    _ => return Err(err("APPEND to a non-list")),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    Some(Value::Object(_)) => {}
                    _ => return Err(err("APPENDS to a non-list")),
                }
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => d.push((k, v)),
                    Some(Value::Object(_)) => {}
                    _ => return Err(err("SETITEM on a non-dict")),
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => {
                        for kv in items.chunks(2) {
                            if kv.len() == 2 {
                                d.push((kv[0].clone(), kv[1].clone()));
                            }
                        }
                    }
                    Some(Value::Object(_)) => {}
                    _ => return Err(err("SETITEMS on a non-dict")),
                }
            }
            b'Q' => {
                // BINPERSID: ('storage', storage_type, key, location, numel)
                let pid = pop(&mut stack)?;
                let Value::Tuple(t) = pid else {
                    return Err(err("persistent id is not a tuple"));
                };
                if t.len() < 5 {
                    return Err(err("persistent id tuple too short"));
                }
                let dtype = match &t[1] {
                    Value::Global(g) => g.rsplit('.').next().unwrap_or(g).to_string(),
                    other => return Err(err(format!("storage type is {}", other.type_name()))),
                };
                let key = match &t[2] {
                    Value::Str(s) => s.clone(),
                    other => return Err(err(format!("storage key is {}", other.type_name()))),
                };
                let numel = as_usize(&t[4], "storage size")?;
                stack.push(Value::Storage { dtype, key, numel })
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                stack.push(reduce(func, args)?)
            }
            0x81 => {
                // NEWOBJ
                let _args = pop(&mut stack)?;
                let cls = pop(&mut stack)?;
                let name = match cls {
                    Value::Global(g) => g,
                    other => other.type_name(),
                };
                stack.push(if name == "collections.OrderedDict" {
                    Value::Dict(Vec::new())
                } else {
                    Value::Object(name)
                })
            }
            b'b' => {
                // BUILD: state is ignored for dicts (OrderedDict `_metadata`) and objects.
                pop(&mut stack)?;
                if stack.is_empty() {
                    return Err(err("BUILD on empty stack"));
                }
            }
            b'0' => {
                pop(&mut stack)?;
            }
            b'2' => {
                let v = stack.last().cloned().ok_or_else(|| err("DUP on empty stack"))?;
                stack.push(v)
            }
            other => {
                return Err(err(format!("unsupported opcode 0x{other:02x} at byte {}", r.p - 1)));
            }
        }
    }
}
