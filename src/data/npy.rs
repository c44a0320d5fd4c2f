//! NumPy `.npy` files: a zero-copy reader on memmap2 and a writer, for the 1-D integer
//! arrays of the dataset layout (SPEC §8).
//!
//! The format (numpy.lib.format):
//!
//! ```text
//! bytes 0..6    magic "\x93NUMPY"
//! bytes 6..8    major, minor version (1.0, 2.0 or 3.0)
//! v1:  u16 LE header length, v2/v3: u32 LE header length
//! header        ASCII (v3: UTF-8) Python dict literal, padded with spaces, ending in '\n':
//!               {'descr': '<u2', 'fortran_order': False, 'shape': (N,), }
//! data          N elements, little-endian, starting at a multiple of 64 bytes (16 in old numpy)
//! ```
//!
//! Only what the dataset needs is read: little-endian uint8, uint16, int32, uint32 and int64,
//! one dimension, C order. Anything else is an error that names the file and says what to do.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;

// The mapped bytes are reinterpreted as native integers, which is only right on a
// little-endian host (every machine this trainer targets).
const _: () = assert!(cfg!(target_endian = "little"), "hrm-cu reads .npy data in place and needs a little-endian host");

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// numpy aligns the start of the data to this many bytes (`numpy.lib.format.ARRAY_ALIGN`).
const ARRAY_ALIGN: usize = 64;
/// numpy leaves room for the length to grow to this many digits (`GROWTH_AXIS_MAX_DIGITS`).
const GROWTH_AXIS_MAX_DIGITS: usize = 21;

/// The element types the dataset layout uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    U8,
    U16,
    I32,
    U32,
    I64,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::U16 => 2,
            DType::I32 | DType::U32 => 4,
            DType::I64 => 8,
        }
    }

    /// The `descr` numpy writes for this type.
    pub fn descr(self) -> &'static str {
        match self {
            DType::U8 => "|u1",
            DType::U16 => "<u2",
            DType::I32 => "<i4",
            DType::U32 => "<u4",
            DType::I64 => "<i8",
        }
    }

    /// NumPy's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::U8 => "uint8",
            DType::U16 => "uint16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::I64 => "int64",
        }
    }

    /// Byte order `<` (little) or `|` (not applicable) followed by the kind and size.
    /// `=` (native) is accepted too since the host is little-endian.
    fn from_descr(descr: &str) -> Option<DType> {
        let (order, code) = descr.split_at_checked(1)?;
        let one_byte = code == "u1";
        match order {
            "<" | "=" => {}
            "|" if one_byte => {}
            _ => return None,
        }
        match code {
            "u1" => Some(DType::U8),
            "u2" => Some(DType::U16),
            "i4" => Some(DType::I32),
            "u4" => Some(DType::U32),
            "i8" => Some(DType::I64),
            _ => None,
        }
    }
}

/// A borrowed 1-D array of one of the supported types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyData<'a> {
    U8(&'a [u8]),
    U16(&'a [u16]),
    I32(&'a [i32]),
    U32(&'a [u32]),
    I64(&'a [i64]),
}

impl NpyData<'_> {
    pub fn dtype(&self) -> DType {
        match self {
            NpyData::U8(_) => DType::U8,
            NpyData::U16(_) => DType::U16,
            NpyData::I32(_) => DType::I32,
            NpyData::U32(_) => DType::U32,
            NpyData::I64(_) => DType::I64,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            NpyData::U8(x) => x.len(),
            NpyData::U16(x) => x.len(),
            NpyData::I32(x) => x.len(),
            NpyData::U32(x) => x.len(),
            NpyData::I64(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn bytes(&self) -> &[u8] {
        match self {
            NpyData::U8(x) => x,
            NpyData::U16(x) => bytemuck::cast_slice(x),
            NpyData::I32(x) => bytemuck::cast_slice(x),
            NpyData::U32(x) => bytemuck::cast_slice(x),
            NpyData::I64(x) => bytemuck::cast_slice(x),
        }
    }
}

/// A memory-mapped `.npy` file holding a 1-D array. The data is read in place, never copied.
#[derive(Debug)]
pub struct NpyArray {
    path: PathBuf,
    map: Mmap,
    dtype: DType,
    len: usize,
    /// Byte offset of the first element in the file.
    data_offset: usize,
}

impl NpyArray {
    /// Maps `path` and checks its header: magic, version, dtype, shape, order, and that the
    /// file holds every element the header promises.
    pub fn open(path: &Path) -> Result<NpyArray> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the map is read-only and lives as long as `NpyArray`. Another process
        // truncating or rewriting the file while we train would change what we read (or
        // raise SIGBUS); dataset files are written once and never modified in place.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        let (dtype, len, data_offset) = parse_prefix(&map).with_context(|| format!("{} is not a readable .npy file", path.display()))?;
        let needed = len.checked_mul(dtype.size()).and_then(|n| n.checked_add(data_offset));
        match needed {
            Some(needed) if needed <= map.len() => {}
            _ => bail!(
                "{} is {} bytes, but its header promises {len} {} elements after a {data_offset}-byte header ({} bytes in all): \
                 the file is truncated; copy or write it again",
                path.display(),
                map.len(),
                dtype.name(),
                needed.map_or("more than 2^64".to_string(), |n| n.to_string())
            ),
        }
        // The map starts on a page boundary, so the data is aligned iff its offset is.
        if data_offset % dtype.size() != 0 {
            bail!(
                "{}: the {} data starts at byte {data_offset}, not a multiple of {}, so it cannot be read in place; \
                 this file was not written by numpy.save: write it again with numpy.save",
                path.display(),
                dtype.name(),
                dtype.size()
            );
        }
        Ok(NpyArray { path: path.to_path_buf(), map, dtype, len, data_offset })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements, in place. `open` checked that they lie inside the map and are aligned,
    /// so the casts below cannot fail.
    pub fn data(&self) -> NpyData<'_> {
        let bytes = &self.map[self.data_offset..self.data_offset + self.len * self.dtype.size()];
        match self.dtype {
            DType::U8 => NpyData::U8(bytes),
            DType::U16 => NpyData::U16(bytemuck::cast_slice(bytes)),
            DType::I32 => NpyData::I32(bytemuck::cast_slice(bytes)),
            DType::U32 => NpyData::U32(bytemuck::cast_slice(bytes)),
            DType::I64 => NpyData::I64(bytemuck::cast_slice(bytes)),
        }
    }

    /// The elements as int64, or an error naming the file when it holds another type.
    pub fn as_i64(&self) -> Result<&[i64]> {
        match self.data() {
            NpyData::I64(x) => Ok(x),
            other => bail!(
                "{} holds {} but must hold int64 (SPEC §8); write it with numpy.save(path, array.astype(numpy.int64))",
                self.path.display(),
                other.dtype().name()
            ),
        }
    }
}

/// Reads magic, version and header; returns (dtype, number of elements, data offset).
fn parse_prefix(bytes: &[u8]) -> Result<(DType, usize, usize)> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        let start = &bytes[..bytes.len().min(6)];
        bail!("bad magic {start:02x?}: a .npy file starts with \\x93NUMPY (is this a .npz, a pickle or a raw dump?)");
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, header_start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                bail!("the file ends inside its version {major}.{minor} header-length field");
            }
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        _ => bail!("format version {major}.{minor} is not supported (1.0, 2.0 and 3.0 are)"),
    };
    let data_offset = header_start + header_len;
    if bytes.len() < data_offset {
        bail!("the header says it is {header_len} bytes but the file ends after {} bytes: the file is truncated", bytes.len());
    }
    let header = std::str::from_utf8(&bytes[header_start..data_offset]).context("the header is not text")?;
    let header = parse_header(header).with_context(|| format!("cannot parse the header {:?}", header.trim_end()))?;
    let dtype = DType::from_descr(&header.descr).with_context(|| {
        format!(
            "unsupported dtype '{}': expected little-endian uint8, uint16, int32, uint32 or int64 ('|u1', '<u2', '<i4', '<u4', '<i8'); \
             convert it with array.astype(...) before numpy.save",
            header.descr
        )
    })?;
    // Even a 1-D array flagged Fortran-order is refused: the writer did something we do not
    // expect, and guessing is how silent corruption starts.
    if header.fortran_order {
        bail!("the array is in Fortran order (fortran_order: True); save a C-order array (numpy.ascontiguousarray)");
    }
    let [len] = header.shape[..] else {
        bail!("shape {:?} is not 1-D; save a flat array (array.reshape(-1))", header.shape);
    };
    Ok((dtype, len, data_offset))
}

/// The three entries of a `.npy` header.
#[derive(Debug, PartialEq)]
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Parses the restricted Python literal numpy writes: a dict with string keys `descr`,
/// `fortran_order` and `shape`, whose values are a string, `True`/`False` and a tuple of
/// integers. A structured dtype (a list as `descr`) is reported as unsupported.
fn parse_header(text: &str) -> Result<Header> {
    let mut p = Cursor { s: text.as_bytes(), i: 0 };
    let (mut descr, mut fortran_order, mut shape) = (None, None, None);
    p.expect(b'{')?;
    loop {
        p.skip_ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.skip_ws();
        p.expect(b':')?;
        p.skip_ws();
        match key.as_str() {
            "descr" if p.peek() == Some(b'[') => bail!("structured dtypes (a list as 'descr') are not supported"),
            "descr" => descr = Some(p.string()?),
            "fortran_order" => fortran_order = Some(p.boolean()?),
            "shape" => shape = Some(p.tuple()?),
            other => bail!("unexpected key '{other}'"),
        }
        p.skip_ws();
        if !p.eat(b',') {
            p.skip_ws();
            p.expect(b'}')?;
            break;
        }
    }
    if p.s[p.i..].iter().any(|c| !c.is_ascii_whitespace()) {
        bail!("unexpected text after the closing brace");
    }
    Ok(Header {
        descr: descr.context("missing 'descr'")?,
        fortran_order: fortran_order.context("missing 'fortran_order'")?,
        shape: shape.context("missing 'shape'")?,
    })
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.i += hit as usize;
        hit
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        if !self.eat(c) {
            bail!("expected '{}' at byte {}", c as char, self.i);
        }
        Ok(())
    }

    /// A single- or double-quoted string without escapes (numpy never writes any).
    fn string(&mut self) -> Result<String> {
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => bail!("expected a quoted string at byte {}", self.i),
        };
        self.i += 1;
        let start = self.i;
        while self.peek().is_some_and(|c| c != quote) {
            self.i += 1;
        }
        let s = std::str::from_utf8(&self.s[start..self.i])?.to_string();
        self.expect(quote)?;
        Ok(s)
    }

    fn boolean(&mut self) -> Result<bool> {
        let rest = &self.s[self.i..];
        if rest.starts_with(b"True") {
            self.i += 4;
            Ok(true)
        } else if rest.starts_with(b"False") {
            self.i += 5;
            Ok(false)
        } else {
            bail!("expected True or False at byte {}", self.i)
        }
    }

    /// `()`, `(N,)`, `(N, M)`, ... of non-negative integers.
    fn tuple(&mut self) -> Result<Vec<usize>> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.skip_ws();
            if self.eat(b')') {
                return Ok(dims);
            }
            let start = self.i;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
            let digits = std::str::from_utf8(&self.s[start..self.i])?;
            dims.push(digits.parse().with_context(|| format!("expected a dimension at byte {start}"))?);
            self.skip_ws();
            if !self.eat(b',') {
                self.skip_ws();
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }
}

/// Writes a 1-D array as numpy.save would (format 1.0, keys sorted, the length padded for
/// growth, data aligned to 64 bytes), going through a temporary file so that a crash never
/// leaves a half-written array under the final name.
pub fn write(path: &Path, data: NpyData<'_>) -> Result<()> {
    let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': ({},), }}", data.dtype().descr(), data.len());
    header.push_str(&" ".repeat(GROWTH_AXIS_MAX_DIGITS.saturating_sub(data.len().to_string().len())));
    // 10 bytes of magic, version and u16 length, the header, its padding and a newline.
    let pad = ARRAY_ALIGN - (10 + header.len() + 1) % ARRAY_ALIGN;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let header_len = u16::try_from(header.len()).context("npy header longer than 65535 bytes")?;

    let tmp = path.with_extension("npy.partial");
    let write = || -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(File::create(&tmp)?);
        out.write_all(MAGIC)?;
        out.write_all(&[1, 0])?;
        out.write_all(&header_len.to_le_bytes())?;
        out.write_all(header.as_bytes())?;
        out.write_all(data.bytes())?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A .npy file with the given version and header text, padded like numpy pads.
    fn raw_npy(major: u8, header: &str, data: &[u8]) -> Vec<u8> {
        let prefix = if major == 1 { 10 } else { 12 };
        let mut h = header.to_string();
        h.push_str(&" ".repeat(ARRAY_ALIGN - (prefix + h.len() + 1) % ARRAY_ALIGN));
        h.push('\n');
        let mut out = MAGIC.to_vec();
        out.extend([major, 0]);
        if major == 1 {
            out.extend((h.len() as u16).to_le_bytes());
        } else {
            out.extend((h.len() as u32).to_le_bytes());
        }
        out.extend(h.as_bytes());
        out.extend(data);
        out
    }

    fn open_bytes(bytes: &[u8]) -> Result<NpyArray> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        std::fs::write(&path, bytes).unwrap();
        NpyArray::open(&path)
    }

    fn open_err(bytes: &[u8]) -> String {
        format!("{:#}", open_bytes(bytes).unwrap_err())
    }

    #[test]
    fn reads_v1_and_v2_headers_of_every_dtype() {
        let u16s: Vec<u8> = [7u16, 65535].iter().flat_map(|x| x.to_le_bytes()).collect();
        let a = open_bytes(&raw_npy(1, "{'descr': '<u2', 'fortran_order': False, 'shape': (2,), }", &u16s)).unwrap();
        assert_eq!(a.data(), NpyData::U16(&[7, 65535]));
        let a = open_bytes(&raw_npy(2, "{\"descr\": \"<u2\", \"fortran_order\": False, \"shape\": (2,)}", &u16s)).unwrap();
        assert_eq!(a.data(), NpyData::U16(&[7, 65535]));

        let i64s: Vec<u8> = [-3i64, 1 << 40].iter().flat_map(|x| x.to_le_bytes()).collect();
        let a = open_bytes(&raw_npy(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }", &i64s)).unwrap();
        assert_eq!(a.as_i64().unwrap(), &[-3, 1 << 40]);
        let a = open_bytes(&raw_npy(1, "{'descr': '|u1', 'fortran_order': False, 'shape': (3,), }", &[1, 2, 255])).unwrap();
        assert_eq!(a.data(), NpyData::U8(&[1, 2, 255]));
        let i32s: Vec<u8> = [-1i32, 9].iter().flat_map(|x| x.to_le_bytes()).collect();
        let a = open_bytes(&raw_npy(1, "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }", &i32s)).unwrap();
        assert_eq!(a.data(), NpyData::I32(&[-1, 9]));
        let a = open_bytes(&raw_npy(1, "{'descr': '<u4', 'fortran_order': False, 'shape': (2,), }", &i32s)).unwrap();
        assert_eq!(a.data(), NpyData::U32(&[u32::MAX, 9]));
        let a = open_bytes(&raw_npy(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (0,), }", &[])).unwrap();
        assert!(a.is_empty());
    }

    #[test]
    fn writer_round_trips_and_pads_like_numpy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let values = [5i64, -6, 7];
        write(&path, NpyData::I64(&values)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // numpy 2.x writes exactly this header for np.array([5, -6, 7], dtype=np.int64).
        let want = "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }";
        assert_eq!(&bytes[10..10 + want.len()], want.as_bytes());
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]) as usize + 10, 128);
        assert_eq!(bytes[127], b'\n');
        assert_eq!(bytes.len(), 128 + 24);
        assert_eq!(NpyArray::open(&path).unwrap().as_i64().unwrap(), &values);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let e = open_err(b"PK\x03\x04 not an npy file");
        assert!(e.contains("bad magic"), "{e}");
        assert!(open_err(b"").contains("bad magic"));
        let mut v4 = raw_npy(1, "{'descr': '<u2', 'fortran_order': False, 'shape': (0,), }", &[]);
        v4[6] = 4;
        assert!(open_err(&v4).contains("version 4.0"));

        let e = open_err(&raw_npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", &[0; 4]));
        assert!(e.contains("unsupported dtype '<f4'"), "{e}");
        let e = open_err(&raw_npy(1, "{'descr': '>u2', 'fortran_order': False, 'shape': (1,), }", &[0; 2]));
        assert!(e.contains("unsupported dtype '>u2'"), "{e}");
        let e = open_err(&raw_npy(1, "{'descr': [('a', '<u2')], 'fortran_order': False, 'shape': (1,), }", &[0; 2]));
        assert!(e.contains("structured"), "{e}");

        let e = open_err(&raw_npy(1, "{'descr': '<u2', 'fortran_order': False, 'shape': (2, 2), }", &[0; 8]));
        assert!(e.contains("not 1-D"), "{e}");
        let e = open_err(&raw_npy(1, "{'descr': '<u2', 'fortran_order': False, 'shape': (), }", &[0; 2]));
        assert!(e.contains("not 1-D"), "{e}");
        let e = open_err(&raw_npy(1, "{'descr': '<u2', 'fortran_order': True, 'shape': (2, 2), }", &[0; 8]));
        assert!(e.contains("Fortran order"), "{e}");
        let e = open_err(&raw_npy(1, "{'descr': '<u2', 'fortran_order': True, 'shape': (2,), }", &[0; 4]));
        assert!(e.contains("Fortran order"), "{e}");

        let e = open_err(&raw_npy(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", &[0; 23]));
        assert!(e.contains("truncated") && e.contains("promises 3 int64"), "{e}");
        let mut short_header = raw_npy(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", &[]);
        short_header.truncate(40);
        assert!(open_err(&short_header).contains("truncated"));
        let e = open_err(&raw_npy(1, "{'descr': '<i8', 'shape': (3,), }", &[0; 24]));
        assert!(e.contains("missing 'fortran_order'"), "{e}");
        let e = open_err(&raw_npy(1, "{'descr': '<i8', 'fortran_order': Nope, 'shape': (3,), }", &[0; 24]));
        assert!(e.contains("True or False"), "{e}");
    }

    #[test]
    fn misaligned_data_is_refused_not_misread() {
        // A hand-made header of odd length: the int64 data would start at byte 10 + 53.
        let header = "{'descr': '<i8', 'fortran_order': False, 'shape': (1,)}";
        let mut bytes = MAGIC.to_vec();
        bytes.extend([1, 0]);
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header.as_bytes());
        bytes.extend([0; 8]);
        let e = open_err(&bytes);
        assert!(e.contains("not a multiple of 8"), "{e}");
    }

    #[test]
    fn wrong_dtype_for_an_index_names_the_file() {
        let a = open_bytes(&raw_npy(1, "{'descr': '<i4', 'fortran_order': False, 'shape': (1,), }", &[0; 4])).unwrap();
        let e = format!("{:#}", a.as_i64().unwrap_err());
        assert!(e.contains("a.npy holds int32 but must hold int64"), "{e}");
    }
}
