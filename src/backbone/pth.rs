//! Reading PyTorch checkpoints (`torch.save` of a state dict) without Python: both the zip
//! format (PyTorch ≥ 1.6, `archive/data.pkl` + `archive/data/<key>`) and the legacy format in
//! which torchvision's published video weights were saved (five pickles followed by raw
//! storages). A small pickle machine understands exactly what state dicts contain: dicts,
//! tuples, lists, strings, numbers, `OrderedDict`, and tensors rebuilt by
//! `torch._utils._rebuild_tensor_v2` from typed storages.
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, bail};
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
enum Value {
    None,
    Int(i64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String),
    /// A value state dicts may carry that we do not interpret (booleans, floats, bytes, objects).
    Other,
    /// `('storage', <StorageClass>, key, location, numel)`.
    Storage {
        kind: Kind,
        key: String,
    },
    Tensor(TensorRef),
    Mark,
}

#[derive(Debug, Clone)]
struct TensorRef {
    kind: Kind,
    key: String,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

fn storage_kind(class: &str) -> anyhow::Result<Kind> {
    let name = class.rsplit('.').next().unwrap_or(class);
    Ok(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        other => bail!("unsupported tensor storage type {other}"),
    })
}

/// Run one pickle program; returns the value and the bytes consumed.
fn unpickle(data: &[u8]) -> anyhow::Result<(Value, usize)> {
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize| -> anyhow::Result<&[u8]> {
        let s = data.get(*pos..*pos + n).context("truncated pickle")?;
        *pos += n;
        Ok(s)
    };
    fn u32le(b: &[u8]) -> u32 {
        u32::from_le_bytes(b.try_into().expect("4 bytes"))
    }
    fn pop_mark(stack: &mut Vec<Value>) -> anyhow::Result<Vec<Value>> {
        let at = stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .context("pickle MARK missing")?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    }
    let pop = |stack: &mut Vec<Value>| stack.pop().context("pickle stack underflow");
    loop {
        let op = *data.get(pos).context("truncated pickle")?;
        pos += 1;
        match op {
            0x80 => {
                take(&mut pos, 1)?;
            } // PROTO
            0x95 => {
                take(&mut pos, 8)?;
            } // FRAME
            b'.' => return Ok((pop(&mut stack)?, pos)), // STOP
            b'(' => stack.push(Value::Mark),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Other),
            0x89 => stack.push(Value::Other),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'J' => stack.push(Value::Int(
                i32::from_le_bytes(take(&mut pos, 4)?.try_into()?) as i64,
            )),
            b'K' => stack.push(Value::Int(take(&mut pos, 1)?[0] as i64)),
            b'M' => stack.push(Value::Int(
                u16::from_le_bytes(take(&mut pos, 2)?.try_into()?) as i64,
            )),
            0x8a => {
                // LONG1: little-endian two's complement of n bytes.
                let n = take(&mut pos, 1)?[0] as usize;
                let b = take(&mut pos, n)?;
                let mut v: i128 = 0;
                for (i, byte) in b.iter().enumerate().take(16) {
                    v |= (*byte as i128) << (8 * i);
                }
                if n > 0 && n < 16 && b[n - 1] & 0x80 != 0 {
                    v -= 1i128 << (8 * n);
                }
                stack.push(Value::Int(v as i64));
            }
            b'G' => {
                take(&mut pos, 8)?;
                stack.push(Value::Other);
            }
            b'X' => {
                let n = u32le(take(&mut pos, 4)?) as usize;
                stack.push(Value::Str(
                    String::from_utf8_lossy(take(&mut pos, n)?).into_owned(),
                ));
            }
            0x8c => {
                let n = take(&mut pos, 1)?[0] as usize;
                stack.push(Value::Str(
                    String::from_utf8_lossy(take(&mut pos, n)?).into_owned(),
                ));
            }
            b'T' => {
                let n = u32le(take(&mut pos, 4)?) as usize;
                stack.push(Value::Str(
                    String::from_utf8_lossy(take(&mut pos, n)?).into_owned(),
                ));
            }
            b'U' => {
                let n = take(&mut pos, 1)?[0] as usize;
                stack.push(Value::Str(
                    String::from_utf8_lossy(take(&mut pos, n)?).into_owned(),
                ));
            }
            b'B' => {
                let n = u32le(take(&mut pos, 4)?) as usize;
                take(&mut pos, n)?;
                stack.push(Value::Other);
            }
            b'C' => {
                let n = take(&mut pos, 1)?[0] as usize;
                take(&mut pos, n)?;
                stack.push(Value::Other);
            }
            b'c' => {
                // GLOBAL: "module\nname\n"
                let rest = &data[pos..];
                let nl1 = rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .context("bad GLOBAL")?;
                let nl2 = rest[nl1 + 1..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .context("bad GLOBAL")?;
                let module = String::from_utf8_lossy(&rest[..nl1]);
                let name = String::from_utf8_lossy(&rest[nl1 + 1..nl1 + 1 + nl2]);
                stack.push(Value::Global(format!("{module}.{name}")));
                pos += nl1 + nl2 + 2;
            }
            0x93 => {
                // STACK_GLOBAL
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(format!("{m}.{n}"))),
                    _ => bail!("bad STACK_GLOBAL"),
                }
            }
            b'q' => {
                let k = take(&mut pos, 1)?[0] as u32;
                memo.insert(k, stack.last().context("empty stack")?.clone());
            }
            b'r' => {
                let k = u32le(take(&mut pos, 4)?);
                memo.insert(k, stack.last().context("empty stack")?.clone());
            }
            0x94 => {
                let k = memo.len() as u32;
                memo.insert(k, stack.last().context("empty stack")?.clone());
            }
            b'h' => {
                let k = take(&mut pos, 1)?[0] as u32;
                stack.push(memo.get(&k).context("bad memo reference")?.clone());
            }
            b'j' => {
                let k = u32le(take(&mut pos, 4)?);
                stack.push(memo.get(&k).context("bad memo reference")?.clone());
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85 => {
                let a = pop(&mut stack)?;
                stack.push(Value::Tuple(vec![a]));
            }
            0x86 => {
                let b = pop(&mut stack)?;
                let a = pop(&mut stack)?;
                stack.push(Value::Tuple(vec![a, b]));
            }
            0x87 => {
                let c = pop(&mut stack)?;
                let b = pop(&mut stack)?;
                let a = pop(&mut stack)?;
                stack.push(Value::Tuple(vec![a, b, c]));
            }
            b'l' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::List(items));
            }
            b'd' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Dict(pairs(items)?));
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.push(v),
                    _ => bail!("APPEND to a non-list"),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => bail!("APPENDS to a non-list"),
                }
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => d.push((k, v)),
                    _ => bail!("SETITEM on a non-dict"),
                }
            }
            b'u' => {
                let items = pairs(pop_mark(&mut stack)?)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => d.extend(items),
                    _ => bail!("SETITEMS on a non-dict"),
                }
            }
            b'b' => {
                // BUILD: attribute state (e.g. a state dict's `_metadata`); not needed.
                pop(&mut stack)?;
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(persistent(pid)?);
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                stack.push(reduce(func, args)?);
            }
            0x81 => {
                // NEWOBJ
                pop(&mut stack)?;
                pop(&mut stack)?;
                stack.push(Value::Other);
            }
            other => bail!(
                "unsupported pickle opcode 0x{other:02x} at byte {}",
                pos - 1
            ),
        }
    }
}

fn pairs(items: Vec<Value>) -> anyhow::Result<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        bail!("odd number of dict items");
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn persistent(pid: Value) -> anyhow::Result<Value> {
    let Value::Tuple(t) = pid else {
        bail!("unexpected persistent id")
    };
    match t.as_slice() {
        [Value::Str(tag), Value::Global(class), key, ..] if tag == "storage" => {
            let key = match key {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                _ => bail!("unexpected storage key"),
            };
            Ok(Value::Storage {
                kind: storage_kind(class)?,
                key,
            })
        }
        _ => bail!("unexpected persistent id {t:?}"),
    }
}

fn ints(v: &Value) -> anyhow::Result<Vec<i64>> {
    match v {
        Value::Tuple(t) | Value::List(t) => t
            .iter()
            .map(|x| match x {
                Value::Int(i) => Ok(*i),
                _ => bail!("expected an integer"),
            })
            .collect(),
        _ => bail!("expected a tuple of integers"),
    }
}

fn reduce(func: Value, args: Value) -> anyhow::Result<Value> {
    let Value::Global(name) = func else {
        return Ok(Value::Other);
    };
    let args = match args {
        Value::Tuple(a) => a,
        _ => bail!("REDUCE arguments are not a tuple"),
    };
    match name.as_str() {
        "collections.OrderedDict" => Ok(Value::Dict(Vec::new())),
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
            let (kind, key) = match args.first() {
                Some(Value::Storage { kind, key }) => (*kind, key.clone()),
                _ => bail!("tensor without storage"),
            };
            let offset = match args.get(1) {
                Some(Value::Int(i)) => *i,
                _ => bail!("tensor without storage offset"),
            };
            Ok(Value::Tensor(TensorRef {
                kind,
                key,
                offset,
                size: ints(args.get(2).context("tensor without size")?)?,
                stride: ints(args.get(3).context("tensor without stride")?)?,
            }))
        }
        "torch._utils._rebuild_parameter" => {
            Ok(args.into_iter().next().context("empty parameter")?)
        }
        _ => Ok(Value::Other),
    }
}

/// The tensors of a state dict (a `module.` prefix from DataParallel is removed, and a
/// checkpoint wrapping the state dict under `state_dict` or `model` is unwrapped).
fn collect(root: Value) -> anyhow::Result<Vec<(String, TensorRef)>> {
    let mut dict = match root {
        Value::Dict(d) => d,
        _ => bail!("the checkpoint does not hold a state dict"),
    };
    for wrapper in ["state_dict", "model", "model_state"] {
        let inner = dict.iter().find_map(|(k, v)| match (k, v) {
            (Value::Str(s), Value::Dict(d)) if s == wrapper => Some(d.clone()),
            _ => None,
        });
        if let Some(inner) = inner {
            dict = inner;
            break;
        }
    }
    let mut out = Vec::new();
    for (k, v) in dict {
        if let (Value::Str(name), Value::Tensor(t)) = (k, v) {
            let name = name
                .strip_prefix("module.")
                .map(str::to_owned)
                .unwrap_or(name);
            out.push((name, t));
        }
    }
    if out.is_empty() {
        bail!("the checkpoint holds no tensors");
    }
    Ok(out)
}

fn element_size(kind: Kind) -> usize {
    match kind {
        Kind::Double | Kind::Int64 => 8,
        Kind::Float | Kind::Int => 4,
        Kind::Half | Kind::BFloat16 | Kind::Int16 => 2,
        _ => 1,
    }
}

fn materialise(
    refs: Vec<(String, TensorRef)>,
    mut storage: impl FnMut(&str) -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<Vec<(String, Tensor)>> {
    let mut cache: HashMap<String, Tensor> = HashMap::new();
    let mut out = Vec::with_capacity(refs.len());
    for (name, r) in refs {
        if !cache.contains_key(&r.key) {
            let bytes = storage(&r.key).with_context(|| format!("reading storage of {name}"))?;
            let n = bytes.len() / element_size(r.kind);
            let t = Tensor::from_data_size(&bytes, &[n as i64], r.kind);
            cache.insert(r.key.clone(), t);
        }
        let base = &cache[&r.key];
        let needed = r.offset
            + r.size
                .iter()
                .zip(&r.stride)
                .map(|(s, st)| (s - 1).max(0) * st)
                .sum::<i64>()
            + 1;
        if r.size.iter().all(|&s| s > 0) && needed > base.size()[0] {
            bail!("tensor {name} reaches past its storage");
        }
        let t = base
            .as_strided(&r.size, &r.stride, Some(r.offset))
            .contiguous();
        out.push((name, t));
    }
    Ok(out)
}

/// Read the tensors of a `torch.save`d state dict, zip or legacy format.
pub fn read(path: &Path) -> anyhow::Result<Vec<(String, Tensor)>> {
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .read_exact(&mut head)
        .context("the file is too short to be a checkpoint")?;
    if head.starts_with(b"PK") {
        read_zip(path)
    } else {
        read_legacy(&std::fs::read(path)?)
    }
}

fn read_zip(path: &Path) -> anyhow::Result<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path)?;
    let mut zip =
        zip::ZipArchive::new(std::io::BufReader::new(file)).context("not a readable zip")?;
    let pkl_name = zip
        .file_names()
        .filter_map(Result::ok)
        .find(|n| n.ends_with("data.pkl"))
        .context("no data.pkl: not a torch.save checkpoint")?
        .into_owned();
    let prefix = pkl_name.trim_end_matches("data.pkl").to_owned();
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)?.read_to_end(&mut pkl)?;
    let (root, _) = unpickle(&pkl)?;
    let refs = collect(root)?;
    materialise(refs, |key| {
        let mut buf = Vec::new();
        zip.by_name(&format!("{prefix}data/{key}"))
            .with_context(|| format!("storage {key} missing"))?
            .read_to_end(&mut buf)?;
        Ok(buf)
    })
}

fn read_legacy(data: &[u8]) -> anyhow::Result<Vec<(String, Tensor)>> {
    const MAGIC: i64 = 0x1950a86a20f9469cfc6c_i128 as i64;
    let (magic, mut pos) = unpickle(data).context("not a PyTorch checkpoint")?;
    match magic {
        Value::Int(m) if m == MAGIC => {}
        _ => bail!("not a PyTorch checkpoint (wrong magic number)"),
    }
    for _ in 0..2 {
        // protocol version, system info
        let (_, n) = unpickle(&data[pos..])?;
        pos += n;
    }
    let (root, n) = unpickle(&data[pos..])?;
    pos += n;
    let (keys, n) = unpickle(&data[pos..])?;
    pos += n;
    let keys: Vec<String> = match keys {
        Value::List(k) => k
            .into_iter()
            .map(|v| match v {
                Value::Str(s) => Ok(s),
                _ => bail!("bad storage key list"),
            })
            .collect::<anyhow::Result<_>>()?,
        _ => bail!("bad storage key list"),
    };
    let refs = collect(root)?;
    let kinds: HashMap<&str, Kind> = refs.iter().map(|(_, r)| (r.key.as_str(), r.kind)).collect();
    // Storages follow in key order: an 8-byte element count, then the raw elements.
    let mut blobs: HashMap<String, Vec<u8>> = HashMap::new();
    for key in &keys {
        let count = i64::from_le_bytes(
            data.get(pos..pos + 8)
                .context("truncated storage")?
                .try_into()?,
        );
        pos += 8;
        let size = element_size(*kinds.get(key.as_str()).unwrap_or(&Kind::Float));
        let len = usize::try_from(count).context("bad storage size")? * size;
        blobs.insert(
            key.clone(),
            data.get(pos..pos + len)
                .context("truncated storage")?
                .to_vec(),
        );
        pos += len;
    }
    materialise(refs, |key| blobs.remove(key).context("storage missing"))
}
