//! Where a plugin keeps its own stack, read from the component at load, so that a trap can be
//! named honestly.
//!
//! Rust (and C) compiled to wasm keep a *shadow stack* in linear memory for locals whose address
//! is taken, separate from the wasm stack wasmtime bounds (`sandbox.max_stack_bytes`). The
//! linker puts it at the bottom of memory (`--stack-first`, what rustc's wasm targets do): the
//! stack pointer global (`__stack_pointer`, global 0 of the module that defines the memory)
//! starts at the stack's size (1 MiB by default) and grows down towards 0. Deep recursion
//! drives it below 0, where it wraps to just under 4 GiB, and the next store through it faults
//! far outside the memory: wasmtime reports `out of bounds memory access`. [`GuestStack`] lets
//! the sandbox recognise that fault and say `stack overflow in the handler (its stack is N KiB)`.
//!
//! Components do not export the stack pointer, and wasmtime 48 shows unexported globals only to
//! `guest_debug` (instrumented, slow code) or in the core dump it attaches to a trap
//! (`Config::coredump_on_trap`, on in `engine`). So on an out-of-bounds trap, in a module whose
//! stack is at the bottom of memory, the sandbox says "stack overflow in the handler" when:
//! - the faulting address (in the trap's context, `memory fault at wasm address 0x…`, for
//!   loads and stores caught by the guard pages) lies within one stack of 4 GiB: a pointer that
//!   went below 0, plus the access's offset; or
//! - a mutable i32 global of the guest (the stack pointer) holds such a wrapped value, or is
//!   within 4 KiB of 0, when the trap happened (bulk `memory.fill` / `memory.copy`, which Rust
//!   uses to zero a frame's arrays, trap without a faulting address).
//!
//! A wild pointer into that window, or an unrelated bug with the stack nearly exhausted, would
//! be named a stack overflow too; any other out-of-bounds access keeps wasmtime's words. A
//! module that keeps its stack above its data (no `--stack-first`) overflows into its own data
//! silently: nothing to detect.

/// The shadow stack of a component's main module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestStack {
    /// Its size in bytes (the stack pointer's initial value: the stack is `[0, bytes)`).
    pub bytes: u32,
}

const WRAP: u64 = 1 << 32;

/// A stack pointer this close to 0 at an out-of-bounds trap is a stack overflowing.
const LOW_WATER: u32 = 4096;

impl GuestStack {
    /// Reads the stack layout of `component` (a component binary): `None` when its main module
    /// does not keep a stack at the bottom of memory, or the binary is not understood.
    pub fn of_component(component: &[u8]) -> Option<Self> {
        let mut found = None;
        walk_component(component, super::validate::MAX_NESTING, &mut |module| {
            if found.is_none() {
                found = module_stack(module);
            }
        })?;
        found
    }

    /// Whether the stack pointer's value `sp` at an out-of-bounds trap says the stack overflowed:
    /// it went below 0 (wrapped to within one stack under 4 GiB), or is in the stack's last
    /// 4 KiB (a function without calls moves only a local copy of the pointer, so the global
    /// holds its caller's, near 0).
    pub fn pointer_overflowed(&self, sp: u32) -> bool {
        let sp = u64::from(sp);
        sp >= WRAP - u64::from(self.bytes) || sp < u64::from(self.bytes.min(LOW_WATER))
    }

    /// Whether an out-of-bounds access at wasm address `addr` is this stack overflowing: a
    /// stack pointer that went below 0 (wrapped to just under 4 GiB), plus the access offset.
    pub fn overflowed_at(&self, addr: u64) -> bool {
        let window = u64::from(self.bytes);
        addr >= WRAP - window && addr < WRAP + window
    }
}

/// The faulting wasm address of a trap, from the context wasmtime adds to it
/// (`memory fault at wasm address 0x… in linear memory of size 0x…`).
pub fn fault_address(err: &wasmtime::Error) -> Option<u64> {
    err.chain().find_map(|e| {
        let text = e.to_string();
        let hex = text.strip_prefix("memory fault at wasm address 0x")?;
        let end = hex.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(hex.len());
        u64::from_str_radix(&hex[..end], 16).ok()
    })
}

/// A cursor over wasm binary bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    /// Unsigned LEB128 (up to 64 bits).
    fn uleb(&mut self) -> Option<u64> {
        let (mut value, mut shift) = (0u64, 0u32);
        loop {
            let b = self.byte()?;
            if shift >= 64 {
                return None;
            }
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(value);
            }
            shift += 7;
        }
    }

    fn len(&mut self) -> Option<usize> {
        usize::try_from(self.uleb()?).ok()
    }

    /// Signed LEB128 as an i32 (`i32.const` immediates).
    fn sleb32(&mut self) -> Option<i32> {
        let (mut value, mut shift) = (0i64, 0u32);
        loop {
            let b = self.byte()?;
            if shift >= 35 {
                return None;
            }
            value |= i64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                if shift < 64 && b & 0x40 != 0 {
                    value |= -1i64 << shift;
                }
                return i32::try_from(value).ok();
            }
        }
    }

    /// Skips a vector of bytes (a name).
    fn skip_name(&mut self) -> Option<()> {
        let n = self.len()?;
        self.take(n).map(|_| ())
    }

    /// Memory or table limits: flags, min, optional max.
    fn skip_limits(&mut self) -> Option<()> {
        let flags = self.byte()?;
        self.uleb()?;
        if flags & 1 != 0 {
            self.uleb()?;
        }
        if flags & 0x08 != 0 {
            // custom page size (log2)
            self.uleb()?;
        }
        Some(())
    }

    /// A constant expression that is exactly `i32.const N; end`; `None` for anything else.
    fn i32_const_expr(&mut self) -> Option<i32> {
        if self.byte()? != 0x41 {
            return None;
        }
        let n = self.sleb32()?;
        (self.byte()? == 0x0b).then_some(n)
    }
}

/// Calls `module` with every core module in `component`, nested components included, down to
/// `depth` levels (`None` past it: the loader refuses deeper components before this runs).
fn walk_component(component: &[u8], depth: usize, module: &mut dyn FnMut(&[u8])) -> Option<()> {
    let depth = depth.checked_sub(1)?;
    let mut r = Reader::new(component);
    if r.take(8)? != b"\0asm\x0d\x00\x01\x00" {
        return None;
    }
    while !r.done() {
        let id = r.byte()?;
        let size = r.len()?;
        let body = r.take(size)?;
        match id {
            1 => module(body),
            4 => walk_component(body, depth, module)?,
            _ => {}
        }
    }
    Some(())
}

/// The shadow stack of a core module, if it defines a memory whose stack is at the bottom:
/// global 0 (the stack pointer) is a mutable i32 starting at N > 0, and no data lies below N.
fn module_stack(module: &[u8]) -> Option<GuestStack> {
    let mut r = Reader::new(module);
    if r.take(8)? != b"\0asm\x01\x00\x00\x00" {
        return None;
    }
    let (mut imported_globals, mut defines_memory) = (0usize, false);
    let (mut stack_top, mut lowest_data) = (None, u64::MAX);
    while !r.done() {
        let id = r.byte()?;
        let size = r.len()?;
        let mut s = Reader::new(r.take(size)?);
        match id {
            // imports: count imported globals (they come first in the global index space)
            2 => {
                for _ in 0..s.len()? {
                    s.skip_name()?;
                    s.skip_name()?;
                    match s.byte()? {
                        0x00 => {
                            s.uleb()?;
                        }
                        0x01 => {
                            s.byte()?;
                            s.skip_limits()?;
                        }
                        0x02 => s.skip_limits()?,
                        0x03 => {
                            s.byte()?;
                            s.byte()?;
                            imported_globals += 1;
                        }
                        0x04 => {
                            s.byte()?;
                            s.uleb()?;
                        }
                        _ => return None,
                    }
                }
            }
            5 => defines_memory = s.len()? > 0,
            6 if imported_globals == 0 && s.len()? > 0 => {
                let (ty, mutable) = (s.byte()?, s.byte()?);
                if ty == 0x7f && mutable == 1 {
                    stack_top = s.i32_const_expr().filter(|n| *n > 0);
                }
            }
            11 => {
                for _ in 0..s.len()? {
                    match s.uleb()? {
                        0 => {}
                        1 => {
                            s.skip_name()?;
                            continue;
                        }
                        2 => {
                            s.uleb()?;
                        }
                        _ => return None,
                    }
                    // An offset that is not a constant: the layout is not the one we know.
                    let offset = s.i32_const_expr()?;
                    lowest_data = lowest_data.min(u64::from(offset as u32));
                    s.skip_name()?;
                }
            }
            _ => {}
        }
    }
    let top = stack_top? as u32;
    (defines_memory && u64::from(top) <= lowest_data).then_some(GuestStack { bytes: top })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(sections: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut m = b"\0asm\x01\x00\x00\x00".to_vec();
        for (id, body) in sections {
            m.push(*id);
            m.push(body.len() as u8);
            m.extend(body);
        }
        m
    }

    fn component(modules: &[Vec<u8>]) -> Vec<u8> {
        let mut c = b"\0asm\x0d\x00\x01\x00".to_vec();
        for m in modules {
            c.push(1);
            let mut n = m.len();
            loop {
                let b = (n & 0x7f) as u8;
                n >>= 7;
                c.push(if n > 0 { b | 0x80 } else { b });
                if n == 0 {
                    break;
                }
            }
            c.extend(m);
        }
        c
    }

    // memory 17 pages; global 0 = mut i32 1048576 (0x80 0x80 0xc0 0x00); data at 1048576
    fn stack_first() -> Vec<u8> {
        module(&[
            (5, vec![1, 0, 17]),
            (6, vec![1, 0x7f, 1, 0x41, 0x80, 0x80, 0xc0, 0x00, 0x0b]),
            (11, vec![1, 0, 0x41, 0x80, 0x80, 0xc0, 0x00, 0x0b, 2, b'h', b'i']),
        ])
    }

    #[test]
    fn a_stack_first_module_is_found_and_its_overflow_recognised() {
        let shim = module(&[(6, vec![])]);
        let stack = GuestStack::of_component(&component(&[shim, stack_first()])).unwrap();
        assert_eq!(stack, GuestStack { bytes: 1 << 20 });
        assert!(stack.overflowed_at((1 << 32) - 16));
        assert!(stack.overflowed_at((1 << 32) + 200));
        assert!(!stack.overflowed_at(70 << 20));
        assert!(!stack.overflowed_at(8));
        assert!(stack.pointer_overflowed(u32::MAX - 511));
        assert!(stack.pointer_overflowed(100));
        assert!(!stack.pointer_overflowed(512 * 1024));
        assert!(!stack.pointer_overflowed(u32::MAX - (2 << 20)));
    }

    #[test]
    fn data_below_the_stack_pointer_means_the_stack_is_not_first() {
        // data at 1024, stack pointer at 1 MiB: the stack sits above the data, no wrap on overflow
        let m = module(&[
            (5, vec![1, 0, 17]),
            (6, vec![1, 0x7f, 1, 0x41, 0x80, 0x80, 0xc0, 0x00, 0x0b]),
            (11, vec![1, 0, 0x41, 0x80, 0x08, 0x0b, 1, b'x']),
        ]);
        assert_eq!(GuestStack::of_component(&component(&[m])), None);
    }

    #[test]
    fn garbage_is_not_understood() {
        assert_eq!(GuestStack::of_component(b"\0asm\x0d\x00\x01\x00\x01\xff"), None);
        assert_eq!(GuestStack::of_component(b""), None);
    }
}
