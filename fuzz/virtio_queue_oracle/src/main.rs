//! virtio-queue-oracle: the chains rust-vmm's `virtio-queue` pops from a split virtqueue in a
//! raw guest-memory image, printed as JSON in the shape of `balloonctl vring parse`.
//!
//! Why it exists: `balloonctl vring parse` is balloonctl's own parser of guest-written rings.
//! A second, independent implementation used by real VMMs (cloud-hypervisor, the vhost-user
//! backends) reading the same bytes tells where the two understand a ring differently;
//! `fuzz/differential.py` compares them and docs/differential-virtio-queue.md lists every
//! known kind of disagreement (the crate silently ends a bad chain, balloonctl stops the
//! queue with a typed error).
//!
//! The queue is set up the way a VMM does when the driver sets DRIVER_OK: `Queue::new(32768)`,
//! then `try_set_size`, the three `try_set_*_address` (alignment, virtio 1.2 section 2.7.1),
//! `set_ready`, `set_next_avail(--last-avail)`, `is_valid` (the rings inside guest memory),
//! then one `iter()` over the available ring (2.7.6) and each `DescriptorChain` walked to its
//! end (2.7.5, 2.7.5.3 for indirect tables). Nothing is ever written to guest memory.
//!
//! The crate keeps a chain's walk state private; its derived `Debug` is the only view of it,
//! so each descriptor's index, whether it came from an indirect table, and where and why a
//! walk stopped are read from that text (`WalkState`). The memory handle's own `Debug` is one
//! word, so that text stays short.
//!
//! Usage (the arguments of `vring parse`; `--decode` is accepted and ignored):
//!
//! ```text
//! virtio-queue-oracle IMAGE --queue-size N --desc GPA --avail GPA --used GPA
//!                     [--base GPA] [--last-avail IDX] [--max-chains K] [--max-descriptors D]
//! virtio-queue-oracle --serve
//! ```
//!
//! `--serve` answers many inputs in one process: each request on stdin is a little-endian u32
//! length, then that many bytes: `u32 queue_size, u64 desc, u64 avail, u64 used, u16
//! last_avail, u32 max_chains (0: all), u32 regions`, then `u64 base, u64 size` per region,
//! then the regions' bytes one after the other (guest RAM may have holes, as the fuzz
//! targets' memory has). Each answer is one JSON line on stdout. A panic inside the crate is
//! answered as `{"panic": MESSAGE}` and the loop goes on.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::{self, Read, Write};
use std::ops::Deref;
use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Memory = GuestMemoryMmap<()>;

/// virtio 1.2 section 2.7: "The maximum Queue Size value is 32768" (the crate's MAX_QUEUE_SIZE).
const MAX_QUEUE_SIZE: u16 = 32768;
/// Bytes of a `--serve` request header before its regions (see the module documentation).
const HEADER: usize = 4 + 8 * 3 + 2 + 4 + 4;
/// Descriptors printed in all, by default: the crate bounds one chain by its table (at most
/// 32768 + 65535 descriptors) but not the queue, so N chains can name one long chain N times.
const DEFAULT_MAX_DESCRIPTORS: usize = 1 << 22;

/// The memory handle given to the crate: a reference whose `Debug` is one word.
#[derive(Clone, Copy)]
struct Mem<'a>(&'a Memory);

impl Deref for Mem<'_> {
    type Target = Memory;

    fn deref(&self) -> &Memory {
        self.0
    }
}

impl fmt::Debug for Mem<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mem")
    }
}

/// What one run pops: the ring's location and how far to go.
#[derive(Clone, Debug)]
struct Params {
    queue_size: u64,
    desc: u64,
    avail: u64,
    used: u64,
    last_avail: u16,
    /// Chains to pop at most (`usize::MAX`: every available one).
    max_chains: usize,
    max_descriptors: usize,
}

/// A `DescriptorChain`'s private walk state, read from its derived `Debug`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WalkState {
    /// The table being walked: the queue's, or the indirect one it switched to.
    table: u64,
    /// Entries of that table (the queue size, or the indirect table's len / 16).
    entries: u16,
    next_index: u16,
    /// Descriptors the walk may still follow through NEXT (the crate's loop bound).
    ttl: u16,
    /// Sum of the lengths yielded so far (u32: the crate ends a chain that would overflow it).
    yielded: u32,
    indirect: bool,
}

fn field<'a>(text: &'a str, name: &str) -> &'a str {
    let key = format!(" {name}: ");
    let start = text
        .rfind(&key)
        .unwrap_or_else(|| panic!("DescriptorChain's Debug has no field {name}: {text}"))
        + key.len();
    let rest = &text[start..];
    let end = rest.find([',', ' ']).unwrap_or(rest.len());
    &rest[..end]
}

fn number<T: std::str::FromStr>(text: &str, name: &str) -> T {
    let value = field(text, name);
    let digits = value
        .strip_prefix("GuestAddress(")
        .and_then(|v| v.strip_suffix(')'))
        .unwrap_or(value);
    digits
        .parse()
        .unwrap_or_else(|_| panic!("DescriptorChain's Debug field {name} is {value:?}"))
}

fn walk_state(chain: &DescriptorChain<Mem<'_>>) -> WalkState {
    let text = format!("{chain:?}");
    WalkState {
        table: number(&text, "desc_table"),
        entries: number(&text, "queue_size"),
        next_index: number(&text, "next_index"),
        ttl: number(&text, "ttl"),
        yielded: number(&text, "yielded_bytes"),
        indirect: match field(&text, "is_indirect") {
            "true" => true,
            "false" => false,
            other => panic!("DescriptorChain's Debug field is_indirect is {other:?}"),
        },
    }
}

// --- the crate's log: is_valid says which ring is out of bounds only there ---------------
thread_local! {
    static LOG: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        LOG.with(|log| log.borrow_mut().push(record.args().to_string()));
    }

    fn flush(&self) {}
}

static LOGGER: Capture = Capture;

fn take_log() -> Vec<String> {
    LOG.with(|log| std::mem::take(&mut *log.borrow_mut()))
}

// --- JSON ---------------------------------------------------------------------------------
fn json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The crate's error variant's name (`GuestMemory(...)` -> `GuestMemory`).
fn variant(error: &virtio_queue::Error) -> String {
    let debug = format!("{error:?}");
    let end = debug.find(['(', ' ', '{']).unwrap_or(debug.len());
    debug[..end].to_string()
}

fn error_json(out: &mut String, kind: &str, message: &str, log: &[String]) {
    out.push_str("{\"type\":");
    json_string(out, kind);
    out.push_str(",\"message\":");
    json_string(out, message);
    out.push_str(",\"head\":null,\"log\":[");
    for (i, line) in log.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_string(out, line);
    }
    out.push_str("]}");
}

/// The whole answer for one image, `{"chains": [...], "error": ..., "truncated": bool}`, and
/// whether the queue was refused.
fn pop_all(regions: &[(u64, &[u8])], p: &Params) -> (String, bool) {
    let mut out = String::from("{\"chains\":[");
    let error = pop_chains(regions, p, &mut out);
    out.push_str("],\"error\":");
    let refused = error.is_err();
    let truncated = match error {
        Ok(truncated) => {
            out.push_str("null");
            truncated
        }
        Err((kind, message)) => {
            error_json(&mut out, &kind, &message, &take_log());
            false
        }
    };
    let _ = write!(out, ",\"truncated\":{truncated}}}");
    take_log();
    (out, refused)
}

/// Pops and prints chains into `out`; `Ok(truncated)` or the queue-level error.
fn pop_chains(
    regions: &[(u64, &[u8])],
    p: &Params,
    out: &mut String,
) -> Result<bool, (String, String)> {
    let fail = |e: virtio_queue::Error| (variant(&e), e.to_string());
    let size = u16::try_from(p.queue_size).map_err(|_| {
        (
            "InvalidSize".to_string(),
            format!(
                "queue size {} does not fit the crate's u16 size",
                p.queue_size
            ),
        )
    })?;
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|&(base, bytes)| (GuestAddress(base), bytes.len()))
        .collect();
    let mem = Memory::from_ranges(&ranges).map_err(|e| {
        (
            "Unrepresentable".to_string(),
            format!("vm-memory cannot hold the regions {ranges:?}: {e}"),
        )
    })?;
    for &(base, bytes) in regions {
        mem.write_slice(bytes, GuestAddress(base))
            .expect("the bytes fit the region made for them");
    }

    let mut queue = Queue::new(MAX_QUEUE_SIZE).expect("32768 is a valid maximum size");
    queue.try_set_size(size).map_err(fail)?;
    queue
        .try_set_desc_table_address(GuestAddress(p.desc))
        .map_err(fail)?;
    queue
        .try_set_avail_ring_address(GuestAddress(p.avail))
        .map_err(fail)?;
    queue
        .try_set_used_ring_address(GuestAddress(p.used))
        .map_err(fail)?;
    queue.set_ready(true);
    queue.set_next_avail(p.last_avail);
    if !queue.is_valid(&mem) {
        let why = take_log().join("; ");
        return Err(("QueueInvalid".to_string(), why));
    }
    let iter = queue.iter(Mem(&mem)).map_err(fail)?;

    let mut printed = 0usize;
    for (n, mut chain) in iter.take(p.max_chains).enumerate() {
        if n > 0 {
            out.push(',');
        }
        let _ = write!(out, "{{\"head\":{},\"descriptors\":[", chain.head_index());
        let mut first = true;
        let end = loop {
            let before = walk_state(&chain);
            let Some(desc) = chain.next() else {
                break walk_state(&chain);
            };
            let after = walk_state(&chain);
            // A switch to an indirect table happens inside next(), which then yields the
            // table's entry 0; otherwise the descriptor is the one next_index named.
            let index = if after.indirect && !before.indirect {
                0
            } else {
                before.next_index
            };
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(
                out,
                "{{\"index\":{index},\"addr\":{},\"len\":{},\"flags\":{},\"next\":{},\"indirect\":{}}}",
                desc.addr().0,
                desc.len(),
                desc.flags(),
                desc.next(),
                after.indirect
            );
            printed += 1;
            if printed >= p.max_descriptors {
                out.push_str("]}");
                return Ok(true);
            }
        };
        let _ = write!(
            out,
            "],\"end\":{{\"indirect\":{},\"table\":{},\"entries\":{},\"next_index\":{},\"ttl\":{},\"bytes\":{}}}}}",
            end.indirect, end.table, end.entries, end.next_index, end.ttl, end.yielded
        );
    }
    Ok(false)
}

// --- command line -------------------------------------------------------------------------
/// A number as `vring parse` reads it: decimal or 0x hex, `_` allowed.
fn parse_int(text: &str, what: &str) -> Result<u64, String> {
    let cleaned: String = text.trim().chars().filter(|&c| c != '_').collect();
    let parsed = match cleaned.strip_prefix("0x").or(cleaned.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => cleaned.parse(),
    };
    parsed.map_err(|_| format!("{what} {text:?} is not a decimal or 0x-hex number"))
}

fn usage() -> String {
    "usage: virtio-queue-oracle IMAGE --queue-size N --desc GPA --avail GPA --used GPA \
     [--base GPA] [--last-avail IDX] [--max-chains K] [--max-descriptors D] | --serve"
        .to_string()
}

fn cli(args: &[String]) -> Result<(String, u64, Params), String> {
    let mut image = None;
    let mut base = 0;
    let (mut size, mut desc, mut avail, mut used) = (None, None, None, None);
    let mut p = Params {
        queue_size: 0,
        desc: 0,
        avail: 0,
        used: 0,
        last_avail: 0,
        max_chains: usize::MAX,
        max_descriptors: DEFAULT_MAX_DESCRIPTORS,
    };
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        if !name.starts_with("--") {
            if image.replace(arg.clone()).is_some() {
                return Err(usage());
            }
            i += 1;
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => {
                i += 1;
                args.get(i).cloned().ok_or_else(usage)?
            }
        };
        match name {
            "--queue-size" => size = Some(parse_int(&value, "number")?),
            "--desc" => desc = Some(parse_int(&value, "address")?),
            "--avail" => avail = Some(parse_int(&value, "address")?),
            "--used" => used = Some(parse_int(&value, "address")?),
            "--base" => base = parse_int(&value, "address")?,
            "--last-avail" => {
                p.last_avail = u16::try_from(parse_int(&value, "index")?)
                    .map_err(|_| format!("index {value:?} is larger than 65535"))?
            }
            "--max-chains" => p.max_chains = parse_int(&value, "number")? as usize,
            "--max-descriptors" => p.max_descriptors = parse_int(&value, "number")? as usize,
            "--decode" => {}
            _ => return Err(usage()),
        }
        i += 1;
    }
    match (image, size, desc, avail, used) {
        (Some(image), Some(size), Some(desc), Some(avail), Some(used)) => {
            p.queue_size = size;
            p.desc = desc;
            p.avail = avail;
            p.used = used;
            Ok((image, base, p))
        }
        _ => Err(usage()),
    }
}

fn le(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rev()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

/// One `--serve` request's answer (the panic, if the crate panicked).
fn serve_one(request: &[u8]) -> String {
    match serve_request(request) {
        Ok(answer) => answer,
        Err(message) => {
            let mut out = String::from("{\"request_error\":");
            json_string(&mut out, &message);
            out.push('}');
            out
        }
    }
}

fn serve_request(request: &[u8]) -> Result<String, String> {
    let short = || {
        format!(
            "request of {} bytes is shorter than its header",
            request.len()
        )
    };
    let head = request.get(..HEADER).ok_or_else(short)?;
    let max_chains = le(&head[30..34]) as usize;
    let p = Params {
        queue_size: le(&head[0..4]),
        desc: le(&head[4..12]),
        avail: le(&head[12..20]),
        used: le(&head[20..28]),
        last_avail: le(&head[28..30]) as u16,
        max_chains: if max_chains == 0 {
            usize::MAX
        } else {
            max_chains
        },
        max_descriptors: DEFAULT_MAX_DESCRIPTORS,
    };
    let count = le(&head[34..38]) as usize;
    let table_end = count
        .checked_mul(16)
        .and_then(|n| n.checked_add(HEADER))
        .ok_or_else(short)?;
    let table = request.get(HEADER..table_end).ok_or_else(short)?;
    let mut data = &request[table_end..];
    let mut regions = Vec::with_capacity(count);
    for entry in table.chunks_exact(16) {
        let size = usize::try_from(le(&entry[8..16])).map_err(|_| short())?;
        if size == 0 || size > data.len() {
            return Err(format!(
                "region of {size} bytes: empty, or beyond the request"
            ));
        }
        let (bytes, rest) = data.split_at(size);
        regions.push((le(&entry[0..8]), bytes));
        data = rest;
    }
    if regions.is_empty() || !data.is_empty() {
        return Err("no region, or bytes left after the regions".to_string());
    }
    match panic::catch_unwind(AssertUnwindSafe(|| pop_all(&regions, &p).0)) {
        Ok(text) => Ok(text),
        Err(payload) => {
            take_log();
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic without a message".to_string());
            let mut out = String::from("{\"panic\":");
            json_string(&mut out, &message);
            out.push('}');
            Ok(out)
        }
    }
}

fn serve() -> io::Result<()> {
    // Panics are answered, not printed: the caller reads one line per request.
    panic::set_hook(Box::new(|_| {}));
    let mut stdin = io::stdin().lock();
    let mut stdout = io::stdout().lock();
    loop {
        let mut len = [0u8; 4];
        match stdin.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut request = vec![0u8; u32::from_le_bytes(len) as usize];
        stdin.read_exact(&mut request)?;
        let answer = serve_one(&request);
        stdout.write_all(answer.as_bytes())?;
        stdout.write_all(b"\n")?;
        stdout.flush()?;
    }
}

fn main() -> ExitCode {
    let _ = log::set_logger(&LOGGER).map(|()| log::set_max_level(log::LevelFilter::Trace));
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--serve") {
        return match serve() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("virtio-queue-oracle: {e}");
                ExitCode::from(1)
            }
        };
    }
    let (path, base, params) = match cli(&args) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("virtio-queue-oracle: {message}");
            return ExitCode::from(2);
        }
    };
    let image = match std::fs::read(&path) {
        Ok(image) if !image.is_empty() => image,
        Ok(_) => {
            eprintln!("virtio-queue-oracle: {path}: the image is empty");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("virtio-queue-oracle: cannot read image {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let (text, refused) = pop_all(&[(base, &image)], &params);
    println!("{text}");
    // As vring parse: exit 3 when the queue was refused.
    if refused {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}
