//! Reads what is still intact out of a redb file that redb refuses to open.
//!
//! redb's own repair can only roll a file back to its previous commit; a page
//! damaged outside redb (zeroed by `dd`, a bad sector) is shared by every
//! commit, so redb reports the whole file corrupt. This module walks the
//! file's B-trees itself, following the documented file format (redb's
//! `docs/design.md`, file format version 3), and keeps what verifies.
//!
//! # Trust
//!
//! Every page is reached through a pointer that comes with the page's
//! checksum (XXH3-128, stored in its parent, or in the commit slot for a
//! root). A page is **trusted** when its content matches that checksum.
//!
//! * The entries of a trusted leaf are returned as trusted.
//! * A page that does not match is damaged. If its pointer came from a trusted
//!   page the pointer is genuine, so the damaged page's entries that still
//!   parse are returned as *untrusted* (the caller quarantines them).
//! * Children are followed from trusted pages, and from damaged pages only
//!   where the child matches the checksum the damaged page gives for it (a
//!   match cannot happen by accident), so no stale or unrelated page is ever
//!   read as part of a table.
//!
//! Only reads; never writes the file. Bounded: every page is visited at most
//! once and the depth is capped, so a damaged pointer cannot make it loop.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
const GOD_BYTE: usize = 9;
const PRIMARY_BIT: u8 = 1;
const PAGE_SIZE_AT: usize = 12;
const REGION_HEADER_PAGES_AT: usize = 16;
const REGION_DATA_PAGES_AT: usize = 20;
const SLOT_AT: [usize; 2] = [64, 64 + 128];
const SLOT_LEN: usize = 128;
const SLOT_CHECKSUM_AT: usize = SLOT_LEN - 16;
const SLOT_USER_ROOT_NON_NULL: usize = 1;
const SLOT_USER_ROOT_AT: usize = 8;
const FILE_FORMAT_VERSION: u8 = 3;
const LEAF: u8 = 1;
const BRANCH: u8 = 2;
const TABLE_NORMAL: u8 = 3;
/// Deeper than any tree a 64-bit file can hold.
const MAX_DEPTH: usize = 64;

/// One key-value pair read from a table.
pub(super) struct Entry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Read from a page whose checksum verified.
    pub trusted: bool,
}

/// One table found in the file.
pub(super) struct Table {
    pub name: String,
    pub entries: Vec<Entry>,
    /// How many entries the table's definition records, when the definition
    /// itself was read from a trusted page.
    pub expected: Option<u64>,
}

/// Everything readable in the file.
pub(super) struct Salvaged {
    pub tables: Vec<Table>,
    /// Tables the file records minus the table definitions that could be read
    /// (their names are unknown), when the count was readable.
    pub tables_missing: Option<u64>,
    /// The latest commit's root was unreadable; this is its predecessor.
    pub from_previous_commit: bool,
}

/// Why nothing could be read at all.
pub(super) type SalvageError = String;

struct Geometry {
    page_size: u64,
    region_len: u64,
    region_header_len: u64,
    region_data_pages: u64,
    file_len: u64,
}

struct Pointer {
    page: u64,
    checksum: u128,
}

struct Reader {
    file: File,
    geo: Geometry,
    visited: HashSet<u64>,
}

fn u16_at(b: &[u8], at: usize) -> Option<usize> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as usize)
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn u128_at(b: &[u8], at: usize) -> Option<u128> {
    Some(u128::from_le_bytes(b.get(at..at + 16)?.try_into().ok()?))
}

fn checksum(data: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(data)
}

/// A B-tree header: root pointer, then the entry count.
fn btree_header(b: &[u8], at: usize) -> Option<(Pointer, u64)> {
    let page = u64_at(b, at)?;
    let checksum = u128_at(b, at + 8)?;
    let length = u64_at(b, at + 24)?;
    Some((Pointer { page, checksum }, length))
}

/// Reads every table of the file at `path`.
pub(super) fn read(path: &Path) -> Result<Salvaged, SalvageError> {
    let mut file = File::open(path).map_err(|e| format!("cannot read the file: {e}"))?;
    let file_len = file
        .metadata()
        .map_err(|e| format!("cannot read the file: {e}"))?
        .len();
    let mut header = [0u8; 512];
    file.read_exact(&mut header)
        .map_err(|_| "the file is shorter than redb's header".to_owned())?;
    if header[..MAGIC.len()] != MAGIC {
        return Err("not a redb file: the magic number is gone".to_owned());
    }
    let page_size = u32_at(&header, PAGE_SIZE_AT).unwrap_or(0) as u64;
    let region_header_pages = u32_at(&header, REGION_HEADER_PAGES_AT).unwrap_or(0) as u64;
    let region_data_pages = u32_at(&header, REGION_DATA_PAGES_AT).unwrap_or(0) as u64;
    if !page_size.is_power_of_two()
        || !(512..=1 << 20).contains(&page_size)
        || region_data_pages == 0
        || region_data_pages > 1 << 20
        || region_header_pages > 1 << 20
    {
        return Err("the file header's page geometry is damaged".to_owned());
    }
    let geo = Geometry {
        page_size,
        region_len: (region_header_pages + region_data_pages) * page_size,
        region_header_len: region_header_pages * page_size,
        region_data_pages,
        file_len,
    };
    // The primary slot first, then the previous commit.
    let primary = usize::from(header[GOD_BYTE] & PRIMARY_BIT != 0);
    let mut roots = Vec::new();
    for (n, slot) in [primary, 1 - primary].into_iter().enumerate() {
        let s = &header[SLOT_AT[slot]..SLOT_AT[slot] + SLOT_LEN];
        let slot_ok = u128_at(s, SLOT_CHECKSUM_AT) == Some(checksum(&s[..SLOT_CHECKSUM_AT]));
        if s[0] != FILE_FORMAT_VERSION {
            if n == 0 && slot_ok {
                return Err(format!(
                    "file format version {} is not one this repair reads (3)",
                    s[0]
                ));
            }
            continue;
        }
        if s[SLOT_USER_ROOT_NON_NULL] == 0 {
            if slot_ok {
                roots.push((n > 0, None, Some(0)));
            }
            continue;
        }
        if let Some((root, tables)) = btree_header(s, SLOT_USER_ROOT_AT) {
            roots.push((n > 0, Some(root), slot_ok.then_some(tables)));
        }
    }
    let mut reader = Reader {
        file,
        geo,
        visited: HashSet::new(),
    };
    // A slot whose root page verifies; else the primary as it is.
    let pick = roots
        .iter()
        .position(|(_, root, _)| match root {
            Some(p) => reader.verifies(p, None, None),
            None => true,
        })
        .unwrap_or(0);
    let Some((from_previous_commit, root, tables_expected)) = roots.into_iter().nth(pick) else {
        return Err("both commit slots are damaged".to_owned());
    };
    let Some(root) = root else {
        return Ok(Salvaged {
            tables: Vec::new(),
            tables_missing: tables_expected,
            from_previous_commit,
        });
    };
    let mut definitions = Vec::new();
    reader.walk(&root, None, None, true, 0, &mut definitions);
    let mut tables = Vec::new();
    for def in definitions {
        let Ok(name) = String::from_utf8(def.key) else {
            continue;
        };
        let v = &def.value;
        // type | length | root non-null | root header | key fixed | value fixed | ...
        if v.len() < 60 || v[0] != TABLE_NORMAL {
            continue;
        }
        let expected = def.trusted.then(|| u64_at(v, 1)).flatten();
        let fixed = |at: usize| (v[at] != 0).then(|| u32_at(v, at + 1)).flatten();
        let (key_fixed, value_fixed) = (fixed(42), fixed(47));
        let mut entries = Vec::new();
        if v[9] != 0 {
            if let Some((root, _)) = btree_header(v, 10) {
                reader.walk(&root, key_fixed, value_fixed, def.trusted, 0, &mut entries);
            }
        }
        tables.push(Table {
            name,
            entries,
            expected,
        });
    }
    let tables_missing = tables_expected.map(|n| n.saturating_sub(tables.len() as u64));
    Ok(Salvaged {
        tables,
        tables_missing,
        from_previous_commit,
    })
}

impl Reader {
    /// The bytes of the page `number` encodes, when it lies in the file.
    fn page(&mut self, number: u64) -> Option<Vec<u8>> {
        let order = (number >> 59) as u32;
        let index = number & (0x000F_FFFF >> order);
        let region = (number >> 20) & 0x000F_FFFF;
        if order > 20 || (index + 1) << order > self.geo.region_data_pages {
            return None;
        }
        let len = self.geo.page_size << order;
        let start = self.geo.page_size
            + region * self.geo.region_len
            + self.geo.region_header_len
            + index * len;
        if start.checked_add(len)? > self.geo.file_len {
            return None;
        }
        let mut buf = vec![0; len as usize];
        self.file.seek(SeekFrom::Start(start)).ok()?;
        self.file.read_exact(&mut buf).ok()?;
        Some(buf)
    }

    /// Whether the page behind `p` matches its checksum, read as a page of
    /// a tree with these key and value widths.
    fn verifies(
        &mut self,
        p: &Pointer,
        key_fixed: Option<usize>,
        value_fixed: Option<usize>,
    ) -> bool {
        self.page(p.page)
            .is_some_and(|page| page_checksum(&page, key_fixed, value_fixed) == Some(p.checksum))
    }

    /// Collects the entries under `p`. `from_trusted`: `p` was read from a
    /// trusted page, so it really is this tree's page.
    fn walk(
        &mut self,
        p: &Pointer,
        key_fixed: Option<usize>,
        value_fixed: Option<usize>,
        from_trusted: bool,
        depth: usize,
        out: &mut Vec<Entry>,
    ) {
        if depth > MAX_DEPTH || self.visited.contains(&p.page) {
            return;
        }
        let Some(page) = self.page(p.page) else {
            return;
        };
        let trusted = page_checksum(&page, key_fixed, value_fixed) == Some(p.checksum);
        if !trusted && !from_trusted {
            return;
        }
        self.visited.insert(p.page);
        match page[0] {
            LEAF => {
                for (key, value) in leaf_entries(&page, key_fixed, value_fixed) {
                    out.push(Entry {
                        key: key.to_vec(),
                        value: value.to_vec(),
                        trusted,
                    });
                }
            }
            BRANCH => {
                for child in branch_children(&page) {
                    // From a damaged branch only children that verify.
                    if trusted || self.verifies(&child, key_fixed, value_fixed) {
                        self.walk(&child, key_fixed, value_fixed, trusted, depth + 1, out);
                    }
                }
            }
            _ => {}
        }
    }
}

/// The checksum redb records for `page`: XXH3-128 of its used bytes.
fn page_checksum(
    page: &[u8],
    key_fixed: Option<usize>,
    value_fixed: Option<usize>,
) -> Option<u128> {
    let end = match page[0] {
        LEAF => {
            let n = u16_at(page, 2)?;
            leaf_layout(page, n, key_fixed, value_fixed).value_end(n.checked_sub(1)?)?
        }
        BRANCH => {
            let keys = u16_at(page, 2)?;
            branch_key_end(page, keys, keys.checked_sub(1)?, key_fixed)?
        }
        _ => return None,
    };
    Some(checksum(page.get(..end)?))
}

struct LeafLayout<'a> {
    page: &'a [u8],
    n: usize,
    key_fixed: Option<usize>,
    value_fixed: Option<usize>,
}

fn leaf_layout<'a>(
    page: &'a [u8],
    n: usize,
    key_fixed: Option<usize>,
    value_fixed: Option<usize>,
) -> LeafLayout<'a> {
    LeafLayout {
        page,
        n,
        key_fixed,
        value_fixed,
    }
}

impl LeafLayout<'_> {
    fn key_section_start(&self) -> usize {
        let mut at = 4;
        if self.key_fixed.is_none() {
            at += 4 * self.n;
        }
        if self.value_fixed.is_none() {
            at += 4 * self.n;
        }
        at
    }

    fn key_end(&self, i: usize) -> Option<usize> {
        match self.key_fixed {
            Some(w) => Some(self.key_section_start() + w * (i + 1)),
            None => u32_at(self.page, 4 + 4 * i),
        }
    }

    fn value_end(&self, i: usize) -> Option<usize> {
        match self.value_fixed {
            Some(w) => Some(self.key_end(self.n.checked_sub(1)?)? + w * (i + 1)),
            None => {
                let mut at = 4 + 4 * i;
                if self.key_fixed.is_none() {
                    at += 4 * self.n;
                }
                u32_at(self.page, at)
            }
        }
    }
}

/// The pairs of a leaf that lie inside the page, in order.
fn leaf_entries(
    page: &[u8],
    key_fixed: Option<usize>,
    value_fixed: Option<usize>,
) -> Vec<(&[u8], &[u8])> {
    let mut out = Vec::new();
    let Some(n) = u16_at(page, 2) else {
        return out;
    };
    let l = leaf_layout(page, n, key_fixed, value_fixed);
    let Some(mut value_start) = n.checked_sub(1).and_then(|last| l.key_end(last)) else {
        return out;
    };
    let mut key_start = l.key_section_start();
    for i in 0..n {
        let (Some(key_end), Some(value_end)) = (l.key_end(i), l.value_end(i)) else {
            break;
        };
        let key = page.get(key_start..key_end);
        let value = page.get(value_start..value_end);
        if let (Some(key), Some(value)) = (key, value) {
            out.push((key, value));
        }
        key_start = key_end;
        value_start = value_end;
    }
    out
}

fn branch_key_end(page: &[u8], keys: usize, i: usize, key_fixed: Option<usize>) -> Option<usize> {
    let children = keys + 1;
    match key_fixed {
        Some(w) => Some(8 + 24 * children + w * (i + 1)),
        None => u32_at(page, 8 + 24 * children + 4 * i),
    }
}

/// A branch's child pointers with their checksums.
fn branch_children(page: &[u8]) -> Vec<Pointer> {
    let Some(keys) = u16_at(page, 2) else {
        return Vec::new();
    };
    let children = keys + 1;
    (0..children)
        .map_while(|i| {
            Some(Pointer {
                checksum: u128_at(page, 8 + 16 * i)?,
                page: u64_at(page, 8 + 16 * children + 8 * i)?,
            })
        })
        .collect()
}
