//! Kernel command line parsing, mirroring Linux.
//!
//! * [`Params`] splits the line like `parse_args`/`next_arg`
//!   (`lib/cmdline.c`, `kernel/params.c`): whitespace-separated, double
//!   quotes group, `name=value`, quotes stripped from values, stops at `--`.
//! * [`param_eq`] compares names like `parameq`: `-` and `_` are equal.
//! * Numbers follow `simple_strtoull`/`kstrtoull`/`memparse` with base 0
//!   (`0x` hex, leading `0` octal, otherwise decimal).
//! * [`parse_virtio_mmio_device`] reproduces `vm_cmdline_set` of
//!   `drivers/virtio/virtio_mmio.c` including its `sscanf` quirks.
//!
//! Everything works on byte slices and never panics on garbage.

/// Linux's `isspace` (ASCII whitespace plus NBSP, as in `lib/ctype.c`).
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0xa0)
}

fn skip_spaces(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&c| is_space(c)).count();
    &s[n..]
}

/// Iterator over `(name, value)` pairs of a command line.
pub struct Params<'a> {
    rest: &'a [u8],
}

/// Splits `cmdline` into parameters like the kernel does.
pub fn params(cmdline: &[u8]) -> Params<'_> {
    Params {
        rest: skip_spaces(cmdline),
    }
}

impl<'a> Iterator for Params<'a> {
    type Item = (&'a [u8], Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let (name, value, rest) = next_arg(self.rest);
        self.rest = rest;
        if value.is_none() && name == b"--" {
            // Everything after "--" belongs to init, not to the kernel.
            self.rest = &[];
            return None;
        }
        Some((name, value))
    }
}

/// One step of Linux's `next_arg`: returns name, value and the rest.
fn next_arg(input: &[u8]) -> (&[u8], Option<&[u8]>, &[u8]) {
    let quoted = input.first() == Some(&b'"');
    let args = if quoted { &input[1..] } else { input };
    let mut in_quote = quoted;
    let mut equals = 0;
    let mut i = 0;
    while i < args.len() {
        let c = args[i];
        if is_space(c) && !in_quote {
            break;
        }
        // Linux's quirk: an '=' at offset 0 does not count.
        if equals == 0 && c == b'=' {
            equals = i;
        }
        if c == b'"' {
            in_quote = !in_quote;
        }
        i += 1;
    }
    // A closing quote of a quoted token is dropped from whichever string
    // contains it.
    let strip_last = quoted && i > 0 && args[i - 1] == b'"';
    let (name, value) = if equals == 0 {
        let end = if strip_last { i - 1 } else { i };
        (&args[..end], None)
    } else {
        let mut start = equals + 1;
        let mut end = i;
        if start < i && args[start] == b'"' {
            start += 1;
            if args[i - 1] == b'"' {
                end = i - 1;
            }
        }
        if strip_last {
            end = end.min(i - 1);
        }
        (&args[..equals], Some(&args[start..end.max(start)]))
    };
    let rest = if i < args.len() {
        &args[i + 1..]
    } else {
        &args[i..]
    };
    (name, value, skip_spaces(rest))
}

/// Linux's `parameq`: names are equal if they only differ in `-` vs `_`.
pub fn param_eq(name: &[u8], wanted: &str) -> bool {
    let norm = |c: u8| if c == b'-' { b'_' } else { c };
    name.len() == wanted.len()
        && name
            .iter()
            .zip(wanted.bytes())
            .all(|(&a, b)| norm(a) == norm(b))
}

/// Value of the last occurrence of a parameter (Linux: last one wins).
/// `Some(None)` means the parameter was given without `=value`.
pub fn last_value<'a>(cmdline: &'a [u8], wanted: &str) -> Option<Option<&'a [u8]>> {
    params(cmdline)
        .filter(|(name, _)| param_eq(name, wanted))
        .map(|(_, value)| value)
        .last()
}

/// A boolean option: true if the last occurrence is given without a value
/// or with a non-zero number (`probe.verbose`, `probe.verbose=1`).
pub fn flag(cmdline: &[u8], wanted: &str) -> bool {
    match last_value(cmdline, wanted) {
        None => false,
        Some(None) => true,
        Some(Some(value)) => kstrtoull(value, 0).is_some_and(|n| n != 0),
    }
}

fn at(s: &[u8], i: usize) -> u8 {
    s.get(i).copied().unwrap_or(0)
}

/// `_parse_integer_fixup_radix`: resolves base 0 and skips a `0x` prefix.
fn fixup_radix(s: &[u8], base: u32) -> (usize, u32) {
    let mut base = base;
    if base == 0 {
        base = if at(s, 0) == b'0' {
            if at(s, 1).eq_ignore_ascii_case(&b'x') && at(s, 2).is_ascii_hexdigit() {
                16
            } else {
                8
            }
        } else {
            10
        };
    }
    if base == 16 && at(s, 0) == b'0' && at(s, 1).eq_ignore_ascii_case(&b'x') {
        (2, base)
    } else {
        (0, base)
    }
}

/// `_parse_integer`: digits consumed, value (wrapping) and overflow flag.
fn parse_digits(s: &[u8], base: u32) -> (usize, u64, bool) {
    let mut value = 0u64;
    let mut overflow = false;
    let mut n = 0;
    for &c in s {
        let digit = match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'a'..=b'f' | b'A'..=b'F' => u32::from((c | 0x20) - b'a') + 10,
            _ => break,
        };
        if digit >= base {
            break;
        }
        let (mul, o1) = value.overflowing_mul(u64::from(base));
        let (sum, o2) = mul.overflowing_add(u64::from(digit));
        overflow |= o1 || o2;
        value = sum;
        n += 1;
    }
    (n, value, overflow)
}

/// `simple_strtoull(s, &end, base)`: value and bytes consumed. Consumes
/// nothing (value 0) if there are no digits; silently wraps on overflow.
pub fn simple_strtoull(s: &[u8], base: u32) -> (u64, usize) {
    let (prefix, base) = fixup_radix(s, base);
    let (n, value, _) = parse_digits(&s[prefix..], base);
    (value, prefix + n)
}

/// `simple_strtoll`: like [`simple_strtoull`] with an optional `-`.
fn simple_strtoll(s: &[u8], base: u32) -> (i64, usize) {
    if at(s, 0) == b'-' {
        let (v, n) = simple_strtoull(&s[1..], base);
        ((v as i64).wrapping_neg(), n + 1)
    } else {
        let (v, n) = simple_strtoull(s, base);
        (v as i64, n)
    }
}

/// `kstrtoull(s, base)`: the whole string (optionally `+`-prefixed, one
/// trailing newline allowed) must be a number that fits in a `u64`.
pub fn kstrtoull(s: &[u8], base: u32) -> Option<u64> {
    let s = s.strip_prefix(b"+").unwrap_or(s);
    let (prefix, base) = fixup_radix(s, base);
    let digits = &s[prefix..];
    let (n, value, overflow) = parse_digits(digits, base);
    if overflow || n == 0 {
        return None;
    }
    let tail = &digits[n..];
    matches!(tail, [] | [b'\n']).then_some(value)
}

/// `kstrtouint(s, base)`.
pub fn kstrtouint(s: &[u8], base: u32) -> Option<u32> {
    kstrtoull(s, base).and_then(|v| u32::try_from(v).ok())
}

/// `memparse`: a number with an optional K/M/G/T/P/E suffix; returns the
/// value and the bytes consumed.
pub fn memparse(s: &[u8]) -> (u64, usize) {
    let (mut value, mut n) = simple_strtoull(s, 0);
    let shift = match at(s, n).to_ascii_uppercase() {
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => 0,
    };
    if shift != 0 {
        value <<= shift;
        n += 1;
    }
    (value, n)
}

/// A parsed `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    pub size: u64,
    pub base: u64,
    pub irq: u32,
}

/// Result of [`parse_virtio_mmio_device`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioParse {
    /// The device, if Linux would register it.
    pub device: Option<VirtioMmioDevice>,
    /// A new value for Linux's running `vm_cmdline_id`: `sscanf` stores
    /// the `:<id>` field even when the token is rejected afterwards.
    pub id: Option<i32>,
}

/// Minimal model of the kernel's `vsscanf` integer conversion: skips
/// whitespace, requires a digit (after `-` for signed conversions) and
/// returns the (wrapped) value and the new position.
fn scan_int(s: &[u8], pos: usize, base: u32, signed: bool) -> Option<(i64, usize)> {
    if pos >= s.len() {
        return None;
    }
    let start = pos + skip_len(&s[pos..]);
    let mut first = at(s, start);
    if signed && first == b'-' {
        first = at(s, start + 1);
    }
    let ok = match base {
        16 => first.is_ascii_hexdigit(),
        8 => (b'0'..=b'7').contains(&first),
        _ => first.is_ascii_digit(),
    };
    if !ok {
        return None;
    }
    let rest = &s[start..];
    let (value, n) = if signed {
        simple_strtoll(rest, base)
    } else {
        let (v, n) = simple_strtoull(rest, base);
        (v as i64, n)
    };
    Some((value, start + n))
}

fn skip_len(s: &[u8]) -> usize {
    s.len() - skip_spaces(s).len()
}

/// Parses a `virtio_mmio.device=` value exactly like Linux's
/// `vm_cmdline_set`: `size = memparse(...)`, then
/// `sscanf(str, "@%lli:%u%n:%d%n", ...)` must convert at least base and
/// irq, nothing may follow, and irq must not be 0.
pub fn parse_virtio_mmio_device(value: &[u8]) -> VirtioMmioParse {
    let (size, n) = memparse(value);
    let s = &value[n..];
    let mut result = VirtioMmioParse {
        device: None,
        id: None,
    };
    // '@' literal, then %lli.
    if at(s, 0) != b'@' {
        return result;
    }
    let Some((base, pos)) = scan_int(s, 1, 0, true) else {
        return result;
    };
    // ':' literal, then %u (truncated to unsigned int), then %n.
    if at(s, pos) != b':' {
        return result;
    }
    let Some((irq, pos)) = scan_int(s, pos + 1, 10, false) else {
        return result;
    };
    let irq = irq as u32;
    let mut consumed = pos;
    // Optional ':' %d %n.
    if at(s, pos) == b':'
        && let Some((id, end)) = scan_int(s, pos + 1, 10, true)
    {
        result.id = Some(id as i32);
        consumed = end;
    }
    if consumed == s.len() && irq != 0 {
        result.device = Some(VirtioMmioDevice {
            size,
            base: base as u64,
            irq,
        });
    }
    result
}

/// An unusable option value: printed as `<name>=<value>`.
#[derive(Clone, Copy, Debug)]
pub struct BadOption<'a> {
    pub name: &'static str,
    pub value: Option<&'a [u8]>,
}

impl core::fmt::Display for BadOption<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.value {
            Some(value) => write!(f, "{}={}", self.name, crate::serial::Bytes(value)),
            None => f.write_str(self.name),
        }
    }
}
