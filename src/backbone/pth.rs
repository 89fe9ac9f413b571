//! Reading PyTorch checkpoints (`torch.save` of a state dict) without Python: both the zip
//! format (PyTorch ≥ 1.6, `archive/data.pkl` + `archive/data/<key>`) and the legacy format in
//! which torchvision's published video weights were saved (five pickles followed by raw
//! storages). A small pickle machine understands exactly what state dicts contain: dicts,
//! tuples, lists, strings, numbers, `OrderedDict`, and tensors rebuilt by
//! `torch._utils._rebuild_tensor_v2` from typed storages. It calls nothing: every other global
//! becomes an opaque value.
//!
//! The files come from outside, so the machine is built to be cheap to run on anything:
//! - Values live in one flat arena and refer to each other by index. A memo reference (`BINGET`)
//!   pushes the same index again, as Python shares the same object: nothing is ever copied, so
//!   a pickle that doubles a tuple 35 times builds 35 small nodes, not 2^35.
//! - Nothing walks values recursively and the arena drops as a flat `Vec`, so deep nesting
//!   cannot exhaust the stack; the depth limit only refuses implausible files early. A
//!   container cannot be changed once it sits inside another one (pickles of state dicts never
//!   do that), so values form a DAG whose recorded depths are exact and which has no cycles.
//! - Budgets ([`Limits`]) bound the pickle's bytes, its objects and the bytes they occupy.
//! - Every tensor view is checked against its storage ([`weights::check_view`]) and every
//!   storage against the bytes in the file before a single storage byte is read, and then only
//!   the storages of the tensors the caller selects are read.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use tch::Tensor;

use super::weights::{self, Dtype, Limits, RawTensor, TensorInfo};

/// Read every tensor of a `torch.save`d state dict, zip or legacy format, within the default
/// [`Limits`]. Callers that know which tensors they want use [`Checkpoint`] (or
/// [`weights::WeightsFile`]) and check names and shapes before any storage is read.
pub fn read(path: &Path) -> anyhow::Result<Vec<(String, Tensor)>> {
    let file = File::open(path).context("opening the checkpoint")?;
    Checkpoint::from_reader(BufReader::new(file), Limits::default())?.read(|_| true)
}

/// The magic number that opens a legacy checkpoint (80 bits, hence `i128`).
const LEGACY_MAGIC: i128 = 0x1950a86a20f9469cfc6c;

fn storage_dtype(class: &str) -> anyhow::Result<Dtype> {
    let name = class.rsplit('.').next().unwrap_or(class);
    Ok(match name {
        "FloatStorage" => Dtype::F32,
        "DoubleStorage" => Dtype::F64,
        "HalfStorage" => Dtype::F16,
        "BFloat16Storage" => Dtype::BF16,
        "LongStorage" => Dtype::I64,
        "IntStorage" => Dtype::I32,
        "ShortStorage" => Dtype::I16,
        "CharStorage" => Dtype::I8,
        "ByteStorage" => Dtype::U8,
        "BoolStorage" => Dtype::Bool,
        other => bail!("unsupported tensor storage type {}", clip(other)),
    })
}

/// At most 60 characters of a string from the file, for an error message.
fn clip(s: &str) -> String {
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// The pickle machine.

/// Index of a value in the arena.
type Id = u32;

#[derive(Debug)]
enum Node {
    None,
    Bool(bool),
    Int(i128),
    Str(Box<str>),
    Tuple(Box<[Id]>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global(Box<str>),
    /// A value state dicts may carry that we do not interpret (floats, bytes, objects).
    Other,
    /// A storage declared by a persistent id: an index into [`Storages`].
    Storage(usize),
    Tensor(Box<TensorRef>),
}

#[derive(Debug)]
struct TensorRef {
    storage: usize,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    /// Containers nested below this value (0 for a leaf).
    depth: u32,
    /// Placed in a container: from then on it may not change.
    contained: bool,
}

/// The values one pickle built. Dropping it frees two flat vectors, whatever their shape.
#[derive(Default)]
struct Arena {
    nodes: Vec<Node>,
    meta: Vec<Meta>,
}

impl Arena {
    fn get(&self, id: Id) -> &Node {
        &self.nodes[id as usize]
    }

    fn str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// A storage as the persistent ids declare it.
#[derive(Debug, Clone)]
struct StorageDecl {
    key: String,
    dtype: Dtype,
    numel: u64,
}

impl StorageDecl {
    /// Bytes of the whole storage; checked when it was declared.
    fn bytes(&self) -> u64 {
        self.numel * self.dtype.size() as u64
    }
}

#[derive(Default)]
struct Storages {
    list: Vec<StorageDecl>,
    by_key: HashMap<String, usize>,
}

impl Storages {
    fn declare(&mut self, key: String, dtype: Dtype, numel: u64) -> anyhow::Result<usize> {
        numel
            .checked_mul(dtype.size() as u64)
            .filter(|&b| b <= i64::MAX as u64)
            .with_context(|| format!("storage `{}` declares {numel} elements", clip(&key)))?;
        if let Some(&i) = self.by_key.get(&key) {
            let d = &self.list[i];
            if d.dtype != dtype || d.numel != numel {
                bail!(
                    "storage `{}` is declared twice, as {} {:?} and as {numel} {dtype:?} elements",
                    clip(&key),
                    d.numel,
                    d.dtype
                );
            }
            return Ok(i);
        }
        self.by_key.insert(key.clone(), self.list.len());
        self.list.push(StorageDecl { key, dtype, numel });
        Ok(self.list.len() - 1)
    }
}

/// What one file's pickles may spend, all together.
struct Budget {
    limits: Limits,
    objects: usize,
    bytes: usize,
}

impl Budget {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            objects: 0,
            bytes: 0,
        }
    }

    fn charge(&mut self, objects: usize, bytes: usize) -> anyhow::Result<()> {
        self.objects = self.objects.saturating_add(objects);
        self.bytes = self.bytes.saturating_add(bytes);
        if self.objects > self.limits.max_objects {
            bail!(
                "the pickle builds more than {} objects; a state dict needs far fewer",
                self.limits.max_objects
            );
        }
        if self.bytes > self.limits.max_value_bytes {
            bail!(
                "the pickle's values need more than {} bytes; a state dict needs far fewer",
                self.limits.max_value_bytes
            );
        }
        Ok(())
    }
}

/// The pickle bytes, counted against a limit that spans every pickle of the file.
struct Input<R> {
    r: R,
    used: u64,
    limit: u64,
}

impl<R: BufRead> Input<R> {
    fn new(r: R, limit: u64) -> Self {
        Self { r, used: 0, limit }
    }

    fn room(&self, n: u64) -> anyhow::Result<()> {
        if self.used.saturating_add(n) > self.limit {
            bail!(
                "the pickle is larger than {} bytes; a state dict's is far smaller",
                self.limit
            );
        }
        Ok(())
    }

    fn eof(e: std::io::Error) -> anyhow::Error {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            anyhow!("truncated pickle")
        } else {
            anyhow!(e).context("reading the pickle")
        }
    }

    fn array<const N: usize>(&mut self) -> anyhow::Result<[u8; N]> {
        self.room(N as u64)?;
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(Self::eof)?;
        self.used += N as u64;
        Ok(b)
    }

    fn byte(&mut self) -> anyhow::Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// `n` bytes whose length the pickle declares: memory follows the bytes that arrive.
    fn bytes(&mut self, n: u64) -> anyhow::Result<Vec<u8>> {
        self.room(n)?;
        let b = weights::read_exactly(&mut self.r, n, 1 << 16).map_err(Self::eof)?;
        self.used += n;
        Ok(b)
    }

    fn skip(&mut self, n: u64) -> anyhow::Result<()> {
        self.room(n)?;
        let got =
            std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink()).map_err(Self::eof)?;
        if got != n {
            bail!("truncated pickle");
        }
        self.used += n;
        Ok(())
    }

    fn text(&mut self, n: u64) -> anyhow::Result<Box<str>> {
        Ok(String::from_utf8_lossy(&self.bytes(n)?).into())
    }

    /// A newline-terminated line (`GLOBAL`'s operands), without the newline.
    fn line(&mut self) -> anyhow::Result<Box<str>> {
        let mut v = Vec::new();
        (&mut self.r)
            .take(self.limit - self.used)
            .read_until(b'\n', &mut v)
            .map_err(Self::eof)?;
        self.used += v.len() as u64;
        if v.pop() != Some(b'\n') {
            self.room(1)?;
            bail!("truncated pickle");
        }
        Ok(String::from_utf8_lossy(&v).into())
    }
}

struct Machine<'a> {
    arena: Arena,
    stack: Vec<Id>,
    /// Stack heights at each MARK (CPython's metastack): items below the top mark are out of
    /// reach until the mark is consumed.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    budget: &'a mut Budget,
    storages: &'a mut Storages,
}

/// Run one pickle program up to its STOP; returns the values it built and the result's id.
fn unpickle<R: BufRead>(
    input: &mut Input<R>,
    budget: &mut Budget,
    storages: &mut Storages,
) -> anyhow::Result<(Arena, Id)> {
    let mut m = Machine {
        arena: Arena::default(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        budget,
        storages,
    };
    loop {
        let at = input.used;
        let op = input.byte()?;
        match op {
            0x80 => {
                input.byte()?; // PROTO
            }
            0x95 => {
                input.array::<8>()?; // FRAME: framing is transparent to a sequential reader
            }
            b'.' => {
                let result = m.pop()?; // STOP
                return Ok((m.arena, result));
            }
            b'(' => {
                m.reserve_stack()?;
                m.marks.push(m.stack.len());
            }
            b'N' => m.push_new(Node::None, 0)?,
            0x88 => m.push_new(Node::Bool(true), 0)?,
            0x89 => m.push_new(Node::Bool(false), 0)?,
            b'}' => m.push_new(Node::Dict(Vec::new()), 0)?,
            b']' => m.push_new(Node::List(Vec::new()), 0)?,
            b')' => m.push_new(Node::Tuple(Box::new([])), 0)?,
            b'J' => {
                let v = i32::from_le_bytes(input.array()?);
                m.push_new(Node::Int(v.into()), 0)?
            }
            b'K' => {
                let v = input.byte()?;
                m.push_new(Node::Int(v.into()), 0)?
            }
            b'M' => {
                let v = u16::from_le_bytes(input.array()?);
                m.push_new(Node::Int(v.into()), 0)?
            }
            0x8a => {
                // LONG1: little-endian two's complement of n bytes.
                let n = input.byte()? as usize;
                if n > 16 {
                    bail!("an integer of {n} bytes; state dicts hold none wider than 16");
                }
                let b = input.bytes(n as u64)?;
                let negative = b.last().is_some_and(|&x| x & 0x80 != 0);
                let mut full = [if negative { 0xff } else { 0 }; 16];
                full[..n].copy_from_slice(&b);
                m.push_new(Node::Int(i128::from_le_bytes(full)), 0)?
            }
            b'G' => {
                input.skip(8)?; // BINFLOAT
                m.push_new(Node::Other, 0)?
            }
            b'X' | b'T' => {
                // BINUNICODE, BINSTRING
                let n = input.u32()? as u64;
                let s = input.text(n)?;
                m.push_new(Node::Str(s), n as usize)?
            }
            0x8c | b'U' => {
                // SHORT_BINUNICODE, SHORT_BINSTRING
                let n = input.byte()? as u64;
                let s = input.text(n)?;
                m.push_new(Node::Str(s), n as usize)?
            }
            b'B' => {
                let n = input.u32()?;
                input.skip(n.into())?;
                m.push_new(Node::Other, 0)?
            }
            b'C' => {
                let n = input.byte()?;
                input.skip(n.into())?;
                m.push_new(Node::Other, 0)?
            }
            b'c' => {
                // GLOBAL: "module\nname\n"
                let module = input.line()?;
                let name = input.line()?;
                let len = module.len() + name.len() + 1;
                m.push_new(Node::Global(format!("{module}.{name}").into()), len)?
            }
            0x93 => {
                // STACK_GLOBAL
                let name = m.pop()?;
                let module = m.pop()?;
                let (Some(module), Some(name)) = (m.arena.str(module), m.arena.str(name)) else {
                    bail!("STACK_GLOBAL without two strings");
                };
                let global: Box<str> = format!("{module}.{name}").into();
                let len = global.len();
                m.push_new(Node::Global(global), len)?
            }
            b'q' => {
                let k = input.byte()?;
                m.memoize(k.into())?
            }
            b'r' => {
                let k = input.u32()?;
                m.memoize(k)?
            }
            0x94 => {
                let k = u32::try_from(m.memo.len()).context("memo full")?;
                m.memoize(k)?
            }
            b'h' => {
                let k = input.byte()?;
                m.memo_get(k.into())?
            }
            b'j' => {
                let k = input.u32()?;
                m.memo_get(k)?
            }
            b't' => {
                let items = m.pop_mark()?;
                m.push_tuple(items)?
            }
            0x85 => {
                let a = m.pop()?;
                m.push_tuple(vec![a])?
            }
            0x86 => {
                let b = m.pop()?;
                let a = m.pop()?;
                m.push_tuple(vec![a, b])?
            }
            0x87 => {
                let c = m.pop()?;
                let b = m.pop()?;
                let a = m.pop()?;
                m.push_tuple(vec![a, b, c])?
            }
            b'l' => {
                let items = m.pop_mark()?;
                let list = m.new_node(Node::List(Vec::new()), 0, 0)?;
                m.extend(list, items)?;
                m.push(list)?
            }
            b'd' => {
                let items = m.pop_mark()?;
                let dict = m.new_node(Node::Dict(Vec::new()), 0, 0)?;
                m.extend(dict, items)?;
                m.push(dict)?
            }
            b'a' => {
                let v = m.pop()?;
                let list = m.top()?;
                m.extend(list, vec![v])?
            }
            b'e' => {
                let items = m.pop_mark()?;
                let list = m.top()?;
                m.extend(list, items)?
            }
            b's' => {
                let v = m.pop()?;
                let k = m.pop()?;
                let dict = m.top()?;
                m.extend(dict, vec![k, v])?
            }
            b'u' => {
                let items = m.pop_mark()?;
                let dict = m.top()?;
                m.extend(dict, items)?
            }
            b'b' => {
                // BUILD: attribute state (e.g. a state dict's `_metadata`); not needed.
                m.pop()?;
                m.top()?;
            }
            b'0' => {
                m.pop()?; // POP
            }
            b'Q' => {
                let pid = m.pop()?;
                let storage = m.persistent(pid)?;
                m.push_new(Node::Storage(storage), 0)?
            }
            b'R' => {
                let args = m.pop()?;
                let func = m.pop()?;
                let result = m.reduce(func, args)?;
                m.push(result)?
            }
            0x81 => {
                // NEWOBJ
                m.pop()?;
                m.pop()?;
                m.push_new(Node::Other, 0)?
            }
            other => bail!("unsupported pickle opcode 0x{other:02x} at byte {at}"),
        }
    }
}

impl Machine<'_> {
    /// Stack and marks together are bounded like objects: a pickle of nothing but `MARK`s or
    /// `BINGET`s must not grow them without end.
    fn reserve_stack(&self) -> anyhow::Result<()> {
        if self.stack.len() + self.marks.len() >= self.budget.limits.max_objects {
            bail!(
                "the pickle stack holds more than {} items",
                self.budget.limits.max_objects
            );
        }
        Ok(())
    }

    fn new_node(&mut self, node: Node, depth: u32, payload: usize) -> anyhow::Result<Id> {
        if depth as usize > self.budget.limits.max_depth {
            bail!(
                "the pickle nests values deeper than {}; a state dict needs a few levels",
                self.budget.limits.max_depth
            );
        }
        self.budget.charge(
            1,
            std::mem::size_of::<Node>() + std::mem::size_of::<Meta>() + payload,
        )?;
        let id = Id::try_from(self.arena.nodes.len()).context("too many pickle values")?;
        self.arena.nodes.push(node);
        self.arena.meta.push(Meta {
            depth,
            contained: false,
        });
        Ok(id)
    }

    fn push(&mut self, id: Id) -> anyhow::Result<()> {
        self.reserve_stack()?;
        self.stack.push(id);
        Ok(())
    }

    fn push_new(&mut self, node: Node, payload: usize) -> anyhow::Result<()> {
        let id = self.new_node(node, 0, payload)?;
        self.push(id)
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> anyhow::Result<Id> {
        if self.stack.len() <= self.floor() {
            bail!("pickle stack underflow");
        }
        Ok(self.stack.pop().expect("above the floor"))
    }

    fn top(&self) -> anyhow::Result<Id> {
        if self.stack.len() <= self.floor() {
            bail!("pickle stack underflow");
        }
        Ok(*self.stack.last().expect("above the floor"))
    }

    fn pop_mark(&mut self) -> anyhow::Result<Vec<Id>> {
        let at = self.marks.pop().context("pickle MARK missing")?;
        Ok(self.stack.split_off(at))
    }

    fn memoize(&mut self, key: u32) -> anyhow::Result<()> {
        let id = self.top()?;
        if self.memo.insert(key, id).is_none() {
            self.budget.charge(1, 16)?;
        }
        Ok(())
    }

    /// The same value again, shared: an index, never a copy.
    fn memo_get(&mut self, key: u32) -> anyhow::Result<()> {
        let id = *self.memo.get(&key).context("bad memo reference")?;
        self.push(id)
    }

    /// Mark `child` as placed in a container and return the depth it gives that container.
    fn place(&mut self, child: Id) -> u32 {
        let meta = &mut self.arena.meta[child as usize];
        meta.contained = true;
        meta.depth + 1
    }

    fn push_tuple(&mut self, items: Vec<Id>) -> anyhow::Result<()> {
        let mut depth = 1;
        for &item in &items {
            depth = depth.max(self.place(item));
        }
        let payload = items.len() * std::mem::size_of::<Id>();
        let id = self.new_node(Node::Tuple(items.into_boxed_slice()), depth, payload)?;
        self.push(id)
    }

    /// Append items to a list, or key/value pairs to a dict, that has not been placed yet.
    fn extend(&mut self, target: Id, items: Vec<Id>) -> anyhow::Result<()> {
        let (is_dict, what) = match self.arena.get(target) {
            Node::List(_) => (false, "list"),
            Node::Dict(_) => (true, "dict"),
            _ => bail!("APPEND or SETITEM on a value that is neither a list nor a dict"),
        };
        if self.arena.meta[target as usize].contained {
            bail!("the pickle changes a {what} after placing it in another value");
        }
        if is_dict && !items.len().is_multiple_of(2) {
            bail!("odd number of dict items");
        }
        if items.contains(&target) {
            bail!("the pickle puts a {what} inside itself");
        }
        self.budget
            .charge(0, items.len() * std::mem::size_of::<Id>())?;
        let mut depth = self.arena.meta[target as usize].depth.max(1);
        for &item in &items {
            depth = depth.max(self.place(item));
        }
        if depth as usize > self.budget.limits.max_depth {
            bail!(
                "the pickle nests values deeper than {}; a state dict needs a few levels",
                self.budget.limits.max_depth
            );
        }
        self.arena.meta[target as usize].depth = depth;
        match &mut self.arena.nodes[target as usize] {
            Node::List(l) => l.extend(items),
            Node::Dict(d) => d.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1]))),
            _ => unreachable!("checked above"),
        }
        Ok(())
    }

    fn int(&self, id: Id, what: &str) -> anyhow::Result<i64> {
        match self.arena.get(id) {
            Node::Int(i) => i64::try_from(*i).with_context(|| format!("{what} out of range")),
            _ => bail!("{what} is not an integer"),
        }
    }

    fn ints(&self, id: Id, what: &str) -> anyhow::Result<Vec<i64>> {
        let items: &[Id] = match self.arena.get(id) {
            Node::Tuple(t) => t,
            Node::List(l) => l,
            _ => bail!("a tensor's {what} is not a tuple of integers"),
        };
        let max = self.budget.limits.max_rank;
        if items.len() > max {
            bail!("a tensor has {} dimensions, more than {max}", items.len());
        }
        items.iter().map(|&i| self.int(i, what)).collect()
    }

    /// `('storage', <StorageClass>, key, location, numel[, view_metadata])`: the zip format
    /// has five fields, the legacy one six (view metadata, always `None` for a whole storage).
    fn persistent(&mut self, pid: Id) -> anyhow::Result<usize> {
        let Node::Tuple(t) = self.arena.get(pid) else {
            bail!("a persistent id that is not a tuple");
        };
        // The length first: a huge tuple, memoized and reused, must not cost its size each time.
        if !(5..=6).contains(&t.len()) {
            bail!("unsupported persistent id: only whole tensor storages are supported");
        }
        let t: Vec<&Node> = t.iter().map(|&i| self.arena.get(i)).collect();
        let (class, key, numel) = match t[..] {
            [
                Node::Str(tag),
                Node::Global(class),
                key,
                Node::Str(_location),
                Node::Int(numel),
                ref view @ ..,
            ] if &**tag == "storage" && matches!(view, [] | [Node::None]) => (class, key, *numel),
            _ => bail!("unsupported persistent id: only whole tensor storages are supported"),
        };
        let key = match key {
            Node::Str(s) => {
                weights::check_name(s, &self.budget.limits)?;
                s.to_string()
            }
            Node::Int(i) => i.to_string(),
            _ => bail!("a storage key that is neither a string nor an integer"),
        };
        let numel = u64::try_from(numel)
            .with_context(|| format!("storage `{}` has a negative size", clip(&key)))?;
        let dtype = storage_dtype(class)?;
        self.budget.charge(1, key.len() + 64)?;
        self.storages.declare(key, dtype, numel)
    }

    fn reduce(&mut self, func: Id, args: Id) -> anyhow::Result<Id> {
        enum Call {
            OrderedDict,
            Tensor,
            Parameter,
            Other,
        }
        let call = match self.arena.get(func) {
            Node::Global(name) => match &**name {
                "collections.OrderedDict" => Call::OrderedDict,
                "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => Call::Tensor,
                "torch._utils._rebuild_parameter"
                | "torch._utils._rebuild_parameter_with_state" => Call::Parameter,
                _ => Call::Other,
            },
            // A callable that is itself the result of a call: opaque, like any other object.
            _ => Call::Other,
        };
        // The first four arguments at most: a huge argument tuple, reused through the memo,
        // must not cost its length on every REDUCE.
        let a: Vec<Id> = match self.arena.get(args) {
            Node::Tuple(a) => a.iter().take(4).copied().collect(),
            _ => bail!("REDUCE arguments are not a tuple"),
        };
        match call {
            Call::OrderedDict => self.new_node(Node::Dict(Vec::new()), 0, 0),
            Call::Tensor => {
                let storage = match a.first().map(|&i| self.arena.get(i)) {
                    Some(Node::Storage(s)) => *s,
                    _ => bail!("a tensor without a storage"),
                };
                let offset =
                    self.int(*a.get(1).context("a tensor without an offset")?, "offset")?;
                let size = self.ints(*a.get(2).context("a tensor without a size")?, "size")?;
                let stride = self.ints(*a.get(3).context("a tensor without strides")?, "stride")?;
                let payload = (size.len() + stride.len()) * 8;
                let t = TensorRef {
                    storage,
                    offset,
                    size,
                    stride,
                };
                self.new_node(Node::Tensor(Box::new(t)), 0, payload)
            }
            Call::Parameter => a.first().copied().context("a parameter without data"),
            Call::Other => self.new_node(Node::Other, 0, 0),
        }
    }
}

/// A tensor the state dict names, as the pickle gave it.
struct Declared {
    name: String,
    storage: usize,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

/// The tensors of a state dict (a `module.` prefix from DataParallel is removed, and a
/// checkpoint wrapping the state dict under `state_dict`, `model` or `model_state` is
/// unwrapped). Looks two levels deep at most: no recursion over the file's values.
fn state_dict(arena: &Arena, root: Id, limits: &Limits) -> anyhow::Result<Vec<Declared>> {
    let dict = |id: Id| match arena.get(id) {
        Node::Dict(d) => Some(d),
        _ => None,
    };
    let mut items = dict(root).context("the checkpoint does not hold a state dict")?;
    for wrapper in ["state_dict", "model", "model_state"] {
        let inner = items
            .iter()
            .find(|&&(k, _)| arena.str(k) == Some(wrapper))
            .and_then(|&(_, v)| dict(v));
        if let Some(inner) = inner {
            items = inner;
            break;
        }
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for &(k, v) in items {
        let (Some(name), Node::Tensor(t)) = (arena.str(k), arena.get(v)) else {
            continue;
        };
        let name = name.strip_prefix("module.").unwrap_or(name);
        weights::check_name(name, limits)?;
        if !seen.insert(name) {
            bail!("the checkpoint names the tensor `{name}` twice");
        }
        if out.len() >= limits.max_tensors {
            bail!(
                "the checkpoint holds more than {} tensors",
                limits.max_tensors
            );
        }
        out.push(Declared {
            name: name.to_owned(),
            storage: t.storage,
            offset: t.offset,
            size: t.size.clone(),
            stride: t.stride.clone(),
        });
    }
    if out.is_empty() {
        bail!("the checkpoint holds no tensors");
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Checkpoints.

/// Where a tensor's elements are in its storage, checked against the storage's size.
#[derive(Debug, Clone)]
struct View {
    storage: usize,
    offset: u64,
    stride: Vec<i64>,
    /// Storage elements the view reaches (0 for an empty tensor).
    extent: u64,
}

enum Source<R> {
    /// Each storage is the zip entry at this index.
    Zip {
        zip: zip::ZipArchive<R>,
        entries: Vec<usize>,
    },
    /// Each storage's first element is at this file offset.
    Legacy { r: R, offsets: Vec<u64> },
}

/// A `torch.save` checkpoint whose pickle has been read and whose tensors have been checked
/// against their storages, none of which has been read yet.
pub struct Checkpoint<R> {
    source: Source<R>,
    storages: Vec<StorageDecl>,
    infos: Vec<TensorInfo>,
    views: Vec<View>,
    limits: Limits,
    file_len: u64,
}

impl<R: Read + Seek> Checkpoint<R> {
    /// Read and check the structure of a zip or legacy checkpoint.
    pub fn from_reader(mut r: R, limits: Limits) -> anyhow::Result<Self> {
        let file_len = r.seek(SeekFrom::End(0))?;
        r.rewind()?;
        let mut magic = [0u8; 2];
        r.read_exact(&mut magic)
            .context("the file is too short to be a checkpoint")?;
        r.rewind()?;
        let mut budget = Budget::new(limits);
        let mut storages = Storages::default();
        let (source, declared) = if &magic == b"PK" {
            open_zip(r, file_len, &mut budget, &mut storages)?
        } else {
            open_legacy(r, file_len, &mut budget, &mut storages)?
        };
        let mut infos = Vec::with_capacity(declared.len());
        let mut views = Vec::with_capacity(declared.len());
        for d in declared {
            let storage = &storages.list[d.storage];
            let extent =
                weights::check_view(&d.size, &d.stride, d.offset, storage.numel, limits.max_rank)
                    .map_err(|e| anyhow!("tensor `{}`: {e}", d.name))?;
            infos.push(TensorInfo {
                name: d.name,
                dtype: storage.dtype,
                shape: d.size,
            });
            views.push(View {
                storage: d.storage,
                offset: d.offset as u64,
                stride: d.stride,
                extent,
            });
        }
        Ok(Self {
            source,
            storages: storages.list,
            infos,
            views,
            limits,
            file_len,
        })
    }

    /// The tensors the state dict names, in its order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.infos
    }

    /// Read the tensors `keep` selects: each storage they use is read once, only as far as
    /// they reach into it; storages of other tensors are never read.
    pub fn read_raw(
        &mut self,
        mut keep: impl FnMut(&TensorInfo) -> bool,
    ) -> anyhow::Result<Vec<RawTensor>> {
        let selected: Vec<usize> = (0..self.infos.len())
            .filter(|&i| keep(&self.infos[i]))
            .collect();
        weights::check_total_bytes(
            selected.iter().map(|&i| &self.infos[i]),
            self.limits.max_tensor_bytes,
        )?;
        // Storage → (elements to read, the selected tensors in it).
        let mut by_storage: BTreeMap<usize, (u64, Vec<usize>)> = BTreeMap::new();
        for &i in &selected {
            let v = &self.views[i];
            let e = by_storage.entry(v.storage).or_default();
            e.0 = e.0.max(v.extent);
            e.1.push(i);
        }
        let mut total = 0u64;
        for (&s, (extent, _)) in &by_storage {
            total = total.saturating_add(extent * self.storages[s].dtype.size() as u64);
        }
        if total > self.limits.max_read_bytes {
            bail!(
                "the selected tensors need {total} bytes of storage, more than {}",
                self.limits.max_read_bytes
            );
        }
        let mut out: Vec<Option<RawTensor>> = vec![None; self.infos.len()];
        for (s, (extent, tensors)) in by_storage {
            let decl = &self.storages[s];
            let es = decl.dtype.size();
            let len = extent * es as u64;
            let data = if len == 0 {
                Vec::new()
            } else {
                match &mut self.source {
                    Source::Zip { zip, entries } => {
                        let mut entry = zip.by_index(entries[s])?;
                        weights::read_exactly(&mut entry, len, self.file_len)
                    }
                    Source::Legacy { r, offsets } => {
                        r.seek(SeekFrom::Start(offsets[s]))?;
                        weights::read_exactly(r, len, self.file_len)
                    }
                }
                .with_context(|| format!("reading storage `{}`", clip(&decl.key)))?
            };
            for i in tensors {
                let (info, view) = (&self.infos[i], &self.views[i]);
                let mut bytes = weights::gather(&data, es, &info.shape, &view.stride, view.offset);
                weights::normalise_bools(info.dtype, &mut bytes);
                out[i] = Some(RawTensor {
                    info: info.clone(),
                    data: bytes,
                });
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// [`Checkpoint::read_raw`], as libtorch tensors.
    pub fn read(
        &mut self,
        keep: impl FnMut(&TensorInfo) -> bool,
    ) -> anyhow::Result<Vec<(String, Tensor)>> {
        Ok(weights::named_tensors(self.read_raw(keep)?))
    }
}

fn open_zip<R: Read + Seek>(
    mut r: R,
    file_len: u64,
    budget: &mut Budget,
    storages: &mut Storages,
) -> anyhow::Result<(Source<R>, Vec<Declared>)> {
    let limits = budget.limits;
    check_zip_directory(&mut r, file_len, &limits)?;
    let mut zip = zip::ZipArchive::new(r).map_err(|e| anyhow!("not a readable zip: {e}"))?;
    // `<archive>/data.pkl`, exactly one, in a top-level folder (as torch.save writes it).
    let pickles: Vec<String> = zip
        .file_names()
        .filter_map(Result::ok)
        .filter(|n| {
            n.strip_suffix("data.pkl")
                .and_then(|d| d.strip_suffix('/'))
                .is_some_and(|d| !d.is_empty() && !d.contains('/'))
        })
        .map(|n| n.into_owned())
        .collect();
    let pkl_name = match &pickles[..] {
        [one] => one.clone(),
        [] => bail!("no data.pkl: not a torch.save checkpoint"),
        _ => bail!("more than one data.pkl: not a torch.save checkpoint"),
    };
    let prefix = pkl_name.trim_end_matches("data.pkl").to_owned();
    let (arena, root) = {
        let entry = zip.by_name(&pkl_name)?;
        if entry.size() > limits.max_pickle_bytes {
            bail!(
                "data.pkl is {} bytes; a state dict's pickle is far below {}",
                entry.size(),
                limits.max_pickle_bytes
            );
        }
        let mut input = Input::new(BufReader::new(entry), limits.max_pickle_bytes);
        unpickle(&mut input, budget, storages)?
    };
    if let Some(i) = zip.index_for_name(&format!("{prefix}byteorder")) {
        let mut order = Vec::new();
        zip.by_index(i)?.take(16).read_to_end(&mut order)?;
        if order.trim_ascii() != b"little" {
            bail!("only little-endian checkpoints are supported");
        }
    }
    let declared = state_dict(&arena, root, &limits)?;
    drop(arena);
    let mut entries = Vec::with_capacity(storages.list.len());
    for decl in &storages.list {
        let key = clip(&decl.key);
        let i = zip
            .index_for_name(&format!("{prefix}data/{}", decl.key))
            .with_context(|| format!("storage `{key}` is missing from the archive"))?;
        let size = zip.by_index(i)?.size();
        if size != decl.bytes() {
            bail!(
                "storage `{key}` holds {size} bytes, but its {} {:?} elements need {}",
                decl.numel,
                decl.dtype,
                decl.bytes()
            );
        }
        entries.push(i);
    }
    Ok((Source::Zip { zip, entries }, declared))
}

fn open_legacy<R: Read + Seek>(
    mut r: R,
    file_len: u64,
    budget: &mut Budget,
    storages: &mut Storages,
) -> anyhow::Result<(Source<R>, Vec<Declared>)> {
    let limits = budget.limits;
    let (declared, keys, mut pos) = {
        let mut input = Input::new(BufReader::new(&mut r), limits.max_pickle_bytes);
        let (arena, magic) = unpickle(&mut input, budget, storages)
            .map_err(|e| anyhow!("not a PyTorch checkpoint: {e}"))?;
        if !matches!(arena.get(magic), Node::Int(LEGACY_MAGIC)) {
            bail!("not a PyTorch checkpoint (wrong magic number)");
        }
        unpickle(&mut input, budget, storages)?; // protocol version
        let (arena, info) = unpickle(&mut input, budget, storages)?;
        if let Node::Dict(d) = arena.get(info) {
            let big_endian = d.iter().any(|&(k, v)| {
                arena.str(k) == Some("little_endian") && matches!(arena.get(v), Node::Bool(false))
            });
            if big_endian {
                bail!("only little-endian checkpoints are supported");
            }
        }
        let (arena, root) = unpickle(&mut input, budget, storages)?;
        let declared = state_dict(&arena, root, &limits)?;
        drop(arena);
        let (arena, list) = unpickle(&mut input, budget, storages)?;
        let Node::List(items) = arena.get(list) else {
            bail!("bad storage key list");
        };
        // Keys are looked up, never copied: the list could repeat one long string a million
        // times through the memo.
        let mut order = Vec::with_capacity(items.len().min(storages.list.len()));
        let mut listed = vec![false; storages.list.len()];
        for &k in items {
            let key = arena.str(k).context("bad storage key list")?;
            let &s = storages.by_key.get(key).with_context(|| {
                format!("the storage list names `{}`, which nothing uses", clip(key))
            })?;
            if std::mem::replace(&mut listed[s], true) {
                bail!("the storage list names `{}` twice", clip(key));
            }
            order.push(s);
        }
        (declared, order, input.used)
    };
    // Storages follow in the listed order: an 8-byte element count, then the raw elements.
    // Only the counts are read here; they must agree with the declarations and the file.
    let mut offsets: Vec<Option<u64>> = vec![None; storages.list.len()];
    for s in keys {
        let decl = &storages.list[s];
        let shown = clip(&decl.key);
        r.seek(SeekFrom::Start(pos))?;
        let mut count = [0u8; 8];
        r.read_exact(&mut count)
            .with_context(|| format!("storage `{shown}` is missing from the file"))?;
        let count = i64::from_le_bytes(count);
        if u64::try_from(count).ok() != Some(decl.numel) {
            bail!(
                "storage `{shown}` holds {count} elements, but is declared with {}",
                decl.numel
            );
        }
        let start = pos + 8;
        let end = start
            .checked_add(decl.bytes())
            .filter(|&e| e <= file_len)
            .with_context(|| format!("storage `{shown}` runs past the end of the file"))?;
        offsets[s] = Some(start);
        pos = end;
    }
    let offsets = offsets
        .into_iter()
        .zip(&storages.list)
        .map(|(o, d)| o.with_context(|| format!("storage `{}` is not in the file", clip(&d.key))))
        .collect::<anyhow::Result<_>>()?;
    Ok((Source::Legacy { r, offsets }, declared))
}

/// Refuse a zip whose directory is larger than a checkpoint's could be, before the zip reader
/// allocates it (it keeps a record per entry): the last end-of-central-directory record, and the
/// zip64 record it points to, say how many entries and bytes the directory has.
fn check_zip_directory<R: Read + Seek>(r: &mut R, len: u64, limits: &Limits) -> anyhow::Result<()> {
    const EOCD: u64 = 22;
    let le16 = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
    let le32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4")) as u64;
    let le64 = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
    let tail_len = len.min(EOCD + u16::MAX as u64);
    r.seek(SeekFrom::Start(len - tail_len))?;
    let tail = weights::read_exactly(r, tail_len, tail_len)?;
    let at = (0..tail.len().saturating_sub(EOCD as usize - 1))
        .rev()
        .find(|&i| tail[i..].starts_with(b"PK\x05\x06"))
        .context("not a zip archive: no end of central directory")?;
    let eocd = &tail[at..at + EOCD as usize];
    let (mut entries, mut dir) = (le16(eocd, 10), le32(eocd, 12));
    if entries == 0xffff || dir == 0xffff_ffff || le32(eocd, 16) == 0xffff_ffff {
        // Zip64: a 20-byte locator just before the record names the zip64 end record.
        let eocd_pos = len - tail_len + at as u64;
        if let Some(loc_pos) = eocd_pos.checked_sub(20) {
            r.seek(SeekFrom::Start(loc_pos))?;
            let loc = weights::read_exactly(r, 20, 20)?;
            if loc.starts_with(b"PK\x06\x07") {
                let rec_pos = le64(&loc, 8);
                if rec_pos.checked_add(56).is_some_and(|e| e <= loc_pos) {
                    r.seek(SeekFrom::Start(rec_pos))?;
                    let rec = weights::read_exactly(r, 56, 56)?;
                    if rec.starts_with(b"PK\x06\x06") {
                        (entries, dir) = (le64(&rec, 32), le64(&rec, 40));
                    }
                }
            }
        }
    }
    if entries > limits.max_zip_entries {
        bail!(
            "the archive lists {entries} entries; a checkpoint has at most {}",
            limits.max_zip_entries
        );
    }
    if dir > limits.max_zip_directory_bytes {
        bail!(
            "the archive's directory is {dir} bytes; a checkpoint's is below {}",
            limits.max_zip_directory_bytes
        );
    }
    r.rewind()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};
    use tch::Kind;

    /// A pickle assembler, enough to write what `torch.save` writes (and what it never would).
    #[derive(Clone, Default)]
    struct P(Vec<u8>);

    impl P {
        fn new() -> Self {
            P(vec![0x80, 2])
        }
        fn op(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        fn s(self, s: &str) -> Self {
            let n = (s.len() as u32).to_le_bytes();
            self.op(b"X").op(&n).op(s.as_bytes())
        }
        fn int(self, i: i64) -> Self {
            match i32::try_from(i) {
                Ok(v) => self.op(b"J").op(&v.to_le_bytes()),
                Err(_) => self.op(&[0x8a, 8]).op(&i.to_le_bytes()),
            }
        }
        fn ints(self, v: &[i64]) -> Self {
            v.iter().fold(self.op(b"("), |p, &i| p.int(i)).op(b"t")
        }
        fn global(self, module: &str, name: &str) -> Self {
            self.op(format!("c{module}\n{name}\n").as_bytes())
        }
        fn stop(self) -> Vec<u8> {
            self.op(b".").0
        }
        /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`, with a
        /// legacy (six-field) or zip (five-field) persistent id.
        #[allow(clippy::too_many_arguments)]
        fn tensor(
            self,
            legacy: bool,
            class: &str,
            key: &str,
            numel: i64,
            offset: i64,
            size: &[i64],
            stride: &[i64],
        ) -> Self {
            let pid = self
                .global("torch._utils", "_rebuild_tensor_v2")
                .op(b"(")
                .op(b"(")
                .s("storage")
                .global("torch", class)
                .s(key)
                .s("cpu")
                .int(numel);
            let pid = if legacy { pid.op(b"N") } else { pid };
            pid.op(b"tQ")
                .int(offset)
                .ints(size)
                .ints(stride)
                .op(&[0x89])
                .global("collections", "OrderedDict")
                .op(b")R")
                .op(b"tR")
        }
    }

    /// A legacy checkpoint: magic, protocol, system info, `root`, the storage keys, storages.
    fn legacy(root: Vec<u8>, storages: &[(&str, i64, &[u8])]) -> Vec<u8> {
        let mut f = P::new().op(&[0x8a, 10]);
        f.0.extend_from_slice(&LEGACY_MAGIC.to_le_bytes()[..10]);
        let mut f = f.stop();
        f.extend(P::new().op(b"M").op(&1001u16.to_le_bytes()).stop());
        f.extend(
            P::new()
                .op(b"}(")
                .s("little_endian")
                .op(&[0x88])
                .op(b"u")
                .stop(),
        );
        f.extend(root);
        f.extend(
            storages
                .iter()
                .fold(P::new().op(b"]("), |p, (k, _, _)| p.s(k))
                .op(b"e")
                .stop(),
        );
        for (_, count, data) in storages {
            f.extend(count.to_le_bytes());
            f.extend_from_slice(data);
        }
        f
    }

    /// A zip checkpoint as torch.save writes it.
    fn zipped(root: Vec<u8>, storages: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        w.start_file("archive/data.pkl", stored).unwrap();
        w.write_all(&root).unwrap();
        w.start_file("archive/byteorder", stored).unwrap();
        w.write_all(b"little").unwrap();
        for (key, data) in storages {
            w.start_file(format!("archive/data/{key}"), stored).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn open(bytes: Vec<u8>) -> anyhow::Result<Checkpoint<Cursor<Vec<u8>>>> {
        Checkpoint::from_reader(Cursor::new(bytes), Limits::default())
    }

    fn read_all(bytes: Vec<u8>) -> anyhow::Result<Vec<(String, Tensor)>> {
        open(bytes)?.read(|_| true)
    }

    fn err(r: anyhow::Result<impl Sized>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => format!("{e:#}"),
        }
    }

    /// `{'module.w': <2×3 transposed view>, 'b': <2 elements at offset 4 of the same storage>}`.
    fn two_tensors(legacy: bool) -> Vec<u8> {
        P::new()
            .global("collections", "OrderedDict")
            .op(b")R")
            .op(b"(")
            .s("module.w")
            .tensor(legacy, "FloatStorage", "0", 6, 0, &[2, 3], &[1, 2])
            .s("b")
            .tensor(legacy, "FloatStorage", "0", 6, 4, &[2], &[1])
            .op(b"u")
            .stop()
    }

    #[test]
    fn state_dicts_read_the_same_in_both_formats() {
        let data = f32s(&[0., 1., 2., 3., 4., 5.]);
        for bytes in [
            legacy(two_tensors(true), &[("0", 6, &data)]),
            zipped(two_tensors(false), &[("0", &data)]),
        ] {
            let t = read_all(bytes).unwrap();
            assert_eq!(t[0].0, "w");
            assert_eq!(t[0].1.size(), [2, 3]);
            assert_eq!(t[0].1.kind(), Kind::Float);
            let w = Vec::<f32>::try_from(t[0].1.flatten(0, -1)).unwrap();
            assert_eq!(w, [0., 2., 4., 1., 3., 5.]);
            assert_eq!(t[1].0, "b");
            assert_eq!(Vec::<f32>::try_from(&t[1].1).unwrap(), [4., 5.]);
        }
    }

    #[test]
    fn memo_references_share_values_instead_of_copying_them() {
        // A tuple doubled 64 times through the memo: 2^64 leaves if copied, 64 nodes if shared.
        let mut p = P::new().op(b")q\x00");
        for _ in 0..64 {
            p = p.op(b"h\x00h\x00\x86q\x00");
        }
        let doubled = p.0[2..].to_vec();
        let root = P::new()
            .op(b"}(")
            .s("w")
            .tensor(true, "FloatStorage", "0", 1, 0, &[1], &[1])
            .s("junk")
            .op(&doubled)
            .op(b"u")
            .stop();
        // Within a 1 MiB value budget: nothing is copied.
        let limits = Limits {
            max_value_bytes: 1 << 20,
            ..Limits::default()
        };
        let bytes = legacy(root, &[("0", 1, &f32s(&[7.]))]);
        let mut c = Checkpoint::from_reader(Cursor::new(bytes), limits).unwrap();
        assert_eq!(c.tensors().len(), 1);
        let t = c.read(|_| true).unwrap();
        assert_eq!(t[0].1.double_value(&[0]), 7.0);

        // The doubled value in an error message is not printed out either.
        let pid = P::new().op(&doubled).op(b"Q").stop();
        let mut input = Input::new(&pid[..], 1 << 20);
        let e = err(unpickle(
            &mut input,
            &mut Budget::new(limits),
            &mut Storages::default(),
        ));
        assert!(e.len() < 200, "{e}");
    }

    #[test]
    fn a_tiny_storage_cannot_be_viewed_as_a_huge_tensor() {
        // One float viewed as 16384×16384 through zero strides: refused before any allocation.
        let root = P::new()
            .op(b"}(")
            .s("w")
            .tensor(true, "FloatStorage", "0", 1, 0, &[16384, 16384], &[0, 0])
            .op(b"u")
            .stop();
        let e = err(open(legacy(root, &[("0", 1, &f32s(&[1.]))])));
        assert!(e.contains("tensor `w`"), "{e}");
        assert!(e.contains("zero and negative strides are refused"), "{e}");

        // The same with overlapping positive strides over 32767 elements.
        let data = vec![0u8; 32767 * 4];
        let root = P::new()
            .op(b"}(")
            .s("w")
            .tensor(
                false,
                "FloatStorage",
                "0",
                32767,
                0,
                &[16384, 16384],
                &[1, 1],
            )
            .op(b"u")
            .stop();
        let e = err(open(zipped(root, &[("0", &data)])));
        assert!(e.contains("self-overlapping"), "{e}");

        // A view past the end, or a negative stride, or arithmetic that overflows 64 bits.
        for (size, stride, offset) in [
            (vec![2, 2], vec![2, 1], 1),
            (vec![4], vec![-1], 3),
            (vec![i64::MAX, 2], vec![1, i64::MAX], 0),
            (vec![3], vec![1], -1),
        ] {
            let root = P::new()
                .op(b"}(")
                .s("w")
                .tensor(true, "FloatStorage", "0", 4, offset, &size, &stride)
                .op(b"u")
                .stop();
            let e = err(open(legacy(root, &[("0", 4, &f32s(&[0.; 4]))])));
            assert!(e.contains("tensor `w`"), "{size:?} {stride:?}: {e}");
        }
    }

    #[test]
    fn storages_must_match_what_the_file_holds() {
        let one = |class: &str, key: &str, numel| {
            P::new()
                .op(b"}(")
                .s("w")
                .tensor(true, class, key, numel, 0, &[1], &[1])
                .op(b"u")
                .stop()
        };
        // A legacy count that disagrees with the declaration.
        let e = err(open(legacy(
            one("FloatStorage", "0", 1),
            &[("0", 2, &[0; 8])],
        )));
        assert!(
            e.contains("holds 2 elements, but is declared with 1"),
            "{e}"
        );
        // A storage whose bytes are not in the file.
        let e = err(open(legacy(
            one("FloatStorage", "0", 1000),
            &[("0", 1000, &[0; 8])],
        )));
        assert!(e.contains("runs past the end of the file"), "{e}");
        // Named twice, or missing from the list.
        let e = err(open(legacy(
            one("FloatStorage", "0", 1),
            &[("0", 1, &[0; 4]), ("0", 1, &[0; 4])],
        )));
        assert!(e.contains("twice"), "{e}");
        let e = err(open(legacy(one("FloatStorage", "0", 1), &[])));
        assert!(e.contains("not in the file"), "{e}");
        // A zip entry of the wrong size, or none at all.
        let e = err(open(zipped(one("FloatStorage", "0", 2), &[("0", &[0; 4])])));
        assert!(
            e.contains("holds 4 bytes, but its 2 F32 elements need 8"),
            "{e}"
        );
        let e = err(open(zipped(one("FloatStorage", "0", 1), &[])));
        assert!(e.contains("missing from the archive"), "{e}");
        // One key declared with two types.
        let root = P::new()
            .op(b"}(")
            .s("a")
            .tensor(true, "FloatStorage", "0", 1, 0, &[1], &[1])
            .s("b")
            .tensor(true, "LongStorage", "0", 1, 0, &[1], &[1])
            .op(b"u")
            .stop();
        let e = err(open(legacy(root, &[("0", 1, &[0; 8])])));
        assert!(e.contains("declared twice"), "{e}");
        // Absurd element counts.
        let e = err(open(legacy(one("DoubleStorage", "0", i64::MAX), &[])));
        assert!(e.contains("declares"), "{e}");
        let e = err(open(legacy(one("QUInt8Storage", "0", 1), &[])));
        assert!(e.contains("unsupported tensor storage type"), "{e}");
    }

    /// Counts the bytes read through it.
    struct Counting<R> {
        inner: R,
        read: std::rc::Rc<std::cell::Cell<u64>>,
    }

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.set(self.read.get() + n as u64);
            Ok(n)
        }
    }

    impl<R: Seek> Seek for Counting<R> {
        fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
            self.inner.seek(pos)
        }
    }

    #[test]
    fn names_and_shapes_are_known_before_any_storage_is_read() {
        // Two 1 MiB storages: opening reads the pickles (and, for legacy, the 8-byte counts).
        let big = vec![0u8; 1 << 20];
        let root = |legacy| {
            P::new()
                .op(b"}(")
                .s("a")
                .tensor(
                    legacy,
                    "FloatStorage",
                    "0",
                    1 << 18,
                    0,
                    &[512, 512],
                    &[512, 1],
                )
                .s("fc.weight")
                .tensor(legacy, "FloatStorage", "1", 1 << 18, 0, &[1 << 18], &[1])
                .op(b"u")
                .stop()
        };
        for bytes in [
            legacy(root(true), &[("0", 1 << 18, &big), ("1", 1 << 18, &big)]),
            zipped(root(false), &[("0", &big), ("1", &big)]),
        ] {
            let read = std::rc::Rc::new(std::cell::Cell::new(0));
            let r = Counting {
                inner: Cursor::new(bytes),
                read: read.clone(),
            };
            let mut c = Checkpoint::from_reader(r, Limits::default()).unwrap();
            // The zip's end-of-directory search reads the last 64 KiB; nothing else is large.
            assert!(read.get() < 128 << 10, "opening read {} bytes", read.get());
            let names: Vec<&str> = c.tensors().iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names, ["a", "fc.weight"]);
            assert_eq!(c.tensors()[0].shape, [512, 512]);
            // Reading one tensor reads its storage, not the other one.
            let before = read.get();
            let t = c.read_raw(|t| t.name == "a").unwrap();
            assert_eq!(t.len(), 1);
            let spent = read.get() - before;
            assert!(
                (1 << 20..(1 << 20) + (128 << 10)).contains(&spent),
                "{spent}"
            );
        }
    }

    #[test]
    fn deep_nesting_cannot_exhaust_the_stack() {
        // About 1 MB of TUPLE1 opcodes: a million levels of nested tuples.
        let mut deep = P::new().op(b")");
        deep.0.extend(std::iter::repeat_n(0x85, 1 << 20));
        let deep = deep.stop();
        let deep2 = deep.clone();
        // A 64 KiB stack: recursion over a million levels (parsing, dropping, formatting)
        // would overflow it and abort the process.
        let run = move || {
            let mut input = Input::new(&deep2[..], 2 << 20);
            let e = err(unpickle(
                &mut input,
                &mut Budget::new(Limits::default()),
                &mut Storages::default(),
            ));
            assert!(e.contains("nests values deeper than 100"), "{e}");
            // Without a depth limit the arena still builds and drops the million levels flat.
            let unlimited = Limits {
                max_depth: usize::MAX,
                max_objects: 2 << 20,
                ..Limits::default()
            };
            let mut input = Input::new(&deep2[..], 2 << 20);
            let (arena, root) = unpickle(
                &mut input,
                &mut Budget::new(unlimited),
                &mut Storages::default(),
            )
            .unwrap();
            assert_eq!(arena.meta[root as usize].depth, 1 << 20);
            let e = err(state_dict(&arena, root, &unlimited));
            assert!(e.contains("does not hold a state dict"), "{e}");
            drop(arena);
        };
        std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(run)
            .unwrap()
            .join()
            .unwrap();
        // As a whole file: the same clean refusal.
        let e = err(open(legacy(deep, &[])));
        assert!(e.contains("nests values deeper than"), "{e}");
    }

    #[test]
    fn containers_cannot_change_once_placed_or_hold_themselves() {
        let run = |p: Vec<u8>| {
            let mut input = Input::new(&p[..], 1 << 20);
            err(unpickle(
                &mut input,
                &mut Budget::new(Limits::default()),
                &mut Storages::default(),
            ))
        };
        // l = []; l.append(l)
        let e = run(P::new().op(b"]q\x00h\x00a").stop());
        assert!(e.contains("inside itself"), "{e}");
        // l = []; t = (l,); l.append(1): what would let a depth grow behind the limit's back.
        let e = run(P::new().op(b"]q\x00h\x00\x850h\x00K\x01a").stop());
        assert!(e.contains("after placing it"), "{e}");
        // Items below a MARK are out of reach.
        let e = run(P::new().op(b"K\x01(\x85").stop());
        assert!(e.contains("underflow"), "{e}");
    }

    #[test]
    fn budgets_bound_objects_bytes_and_pickle_size() {
        let run = |p: &[u8], limits: Limits| {
            let mut input = Input::new(p, limits.max_pickle_bytes);
            err(unpickle(
                &mut input,
                &mut Budget::new(limits),
                &mut Storages::default(),
            ))
        };
        let small = Limits {
            max_objects: 1000,
            max_value_bytes: 10_000,
            max_pickle_bytes: 4096,
            ..Limits::default()
        };
        // 1500 Nones appended to a list one by one: the stack stays short, the objects do not.
        let mut many = P::new().op(b"]");
        many.0.extend(b"Na".repeat(1500));
        let roomy = Limits {
            max_value_bytes: 1 << 20,
            ..small
        };
        let e = run(&many.op(b".").0, roomy);
        assert!(e.contains("more than 1000 objects"), "{e}");
        // Memo references cost no objects, but the stack they grow is bounded too.
        let mut refs = P::new().op(b"Nq\x00");
        refs.0.extend(b"h\x00".repeat(1500));
        let e = run(&refs.op(b".").0, small);
        assert!(e.contains("stack holds more than 1000"), "{e}");
        let strings = (0..10).fold(P::new().op(b"("), |p, _| p.s(&"x".repeat(2000)));
        let strings = strings.op(b"l.").0;
        let e = run(
            &strings,
            Limits {
                max_pickle_bytes: 1 << 20,
                ..small
            },
        );
        assert!(e.contains("values need more than 10000 bytes"), "{e}");
        let e = run(&strings, small);
        assert!(e.contains("larger than 4096 bytes"), "{e}");
        // A declared length far beyond the file is an error, not an allocation.
        let e = run(
            b"\x80\x02X\xff\xff\xff\x7f",
            Limits {
                max_pickle_bytes: u64::MAX,
                ..small
            },
        );
        assert!(e.contains("truncated pickle"), "{e}");
        // GLOBAL's lines are bounded by the same limit.
        let mut global = P::new().op(b"c");
        global.0.extend(b"x".repeat(5000));
        let e = run(&global.0, small);
        assert!(e.contains("larger than 4096 bytes"), "{e}");
    }

    #[test]
    fn names_in_errors_are_bounded() {
        let long = "n".repeat(10_000);
        let root = P::new()
            .op(b"}(")
            .s(&long)
            .tensor(true, "FloatStorage", "0", 1, 0, &[1], &[1])
            .op(b"u")
            .stop();
        let e = err(open(legacy(root, &[("0", 1, &[0; 4])])));
        assert!(e.contains("10000 bytes long"), "{e}");
        assert!(e.len() < 200, "{e}");
        // Duplicate names (after the `module.` prefix is removed) are refused.
        let root = P::new()
            .op(b"}(")
            .s("module.w")
            .tensor(true, "FloatStorage", "0", 1, 0, &[1], &[1])
            .s("w")
            .tensor(true, "FloatStorage", "0", 1, 0, &[1], &[1])
            .op(b"u")
            .stop();
        let e = err(open(legacy(root, &[("0", 1, &[0; 4])])));
        assert!(e.contains("names the tensor `w` twice"), "{e}");
    }

    #[test]
    fn zip_directories_are_bounded_before_they_are_read() {
        // A zip64 end record claiming a billion entries, behind a zip32 record that defers to it.
        let mut f = b"PK\x03\x04".to_vec();
        f.resize(100, 0);
        let rec_pos = f.len() as u64;
        f.extend(b"PK\x06\x06");
        f.extend(44u64.to_le_bytes());
        f.extend([0u8; 4 + 8]);
        f.extend(1_000_000_000u64.to_le_bytes());
        f.extend(1_000_000_000u64.to_le_bytes());
        f.extend(46_000_000_000u64.to_le_bytes());
        f.extend(0u64.to_le_bytes());
        f.extend(b"PK\x06\x07");
        f.extend(0u32.to_le_bytes());
        f.extend(rec_pos.to_le_bytes());
        f.extend(1u32.to_le_bytes());
        f.extend(b"PK\x05\x06");
        f.extend([0u8; 4]);
        f.extend([0xff; 4 + 4 + 4]);
        f.extend([0u8; 2]);
        let e = err(open(f));
        assert!(e.contains("lists 1000000000 entries"), "{e}");
    }
}
