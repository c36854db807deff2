//! Reading just enough of an ELF file to prove it is a static executable: a 64-bit little-endian x86-64
//! `ET_EXEC` image with no `PT_INTERP` (no dynamic loader) and no `PT_DYNAMIC` (nothing to relocate or
//! link at load time). Layouts are from the System V ABI's "ELF Header" and "Program Header" chapters.

use std::fmt;

/// `e_ident[EI_MAG0..4]`.
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
/// `e_ident[EI_CLASS]` for 64-bit objects.
const ELFCLASS64: u8 = 2;
/// `e_ident[EI_DATA]` for little-endian objects.
const ELFDATA2LSB: u8 = 1;
/// `e_type` of an executable (as opposed to `ET_DYN`, a PIE or shared object).
pub const ET_EXEC: u16 = 2;
/// `e_machine` for x86-64.
const EM_X86_64: u16 = 62;
/// `p_type` of the segment naming the dynamic loader.
pub const PT_INTERP: u32 = 3;
/// `p_type` of the dynamic-linking segment.
pub const PT_DYNAMIC: u32 = 2;
/// Size of the 64-bit ELF header.
const EHDR_SIZE: usize = 64;
/// Size of one 64-bit program header.
const PHDR_SIZE: usize = 56;

/// Why a file is not a static x86-64 executable.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ElfError {
    /// The file is shorter than the structure read at `offset`.
    Truncated {
        /// Where the missing bytes start.
        offset: usize,
        /// The file's length.
        len: usize,
    },
    /// Not an ELF file, or not 64-bit little-endian x86-64.
    NotElf64 {
        /// What was wrong.
        what: &'static str,
    },
    /// `e_type` is not `ET_EXEC` (3 = `ET_DYN`: a PIE or shared object).
    NotExec {
        /// The `e_type` found.
        e_type: u16,
    },
    /// `e_phentsize` is not the 64-bit program-header size.
    BadPhentsize {
        /// The `e_phentsize` found.
        phentsize: u16,
    },
    /// A program header of a type a static executable does not have.
    DynamicSegment {
        /// The index of the program header.
        index: usize,
        /// Its `p_type` (`PT_INTERP` or `PT_DYNAMIC`).
        p_type: u32,
    },
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElfError::Truncated { offset, len } => {
                write!(f, "file truncated: {len} bytes, need more at {offset}")
            }
            ElfError::NotElf64 { what } => write!(f, "not a 64-bit little-endian x86-64 ELF file: {what}"),
            ElfError::NotExec { e_type } => write!(f, "e_type is {e_type}, not ET_EXEC ({ET_EXEC})"),
            ElfError::BadPhentsize { phentsize } => {
                write!(f, "e_phentsize is {phentsize}, not {PHDR_SIZE}")
            }
            ElfError::DynamicSegment { index, p_type } => {
                let name = if *p_type == PT_INTERP { "PT_INTERP" } else { "PT_DYNAMIC" };
                write!(f, "program header {index} is {name}: the binary is dynamically linked")
            }
        }
    }
}

impl std::error::Error for ElfError {}

/// Checks that `image` (a whole ELF file) is a static x86-64 executable and returns its program-header
/// count.
///
/// # Errors
/// The first property the file lacks, see [`ElfError`].
pub fn check_static_executable(image: &[u8]) -> Result<usize, ElfError> {
    if image.get(..4) != Some(&ELF_MAGIC[..]) {
        return Err(ElfError::NotElf64 { what: "bad magic" });
    }
    let ident = bytes(image, 0, 16)?;
    if ident[4] != ELFCLASS64 {
        return Err(ElfError::NotElf64 { what: "EI_CLASS is not ELFCLASS64" });
    }
    if ident[5] != ELFDATA2LSB {
        return Err(ElfError::NotElf64 { what: "EI_DATA is not ELFDATA2LSB" });
    }
    bytes(image, 0, EHDR_SIZE)?;
    if u16_at(image, 18)? != EM_X86_64 {
        return Err(ElfError::NotElf64 { what: "e_machine is not EM_X86_64" });
    }
    let e_type = u16_at(image, 16)?;
    if e_type != ET_EXEC {
        return Err(ElfError::NotExec { e_type });
    }
    let phoff = usize::try_from(u64_at(image, 32)?).unwrap_or(usize::MAX);
    let phentsize = u16_at(image, 54)?;
    let phnum = usize::from(u16_at(image, 56)?);
    if usize::from(phentsize) != PHDR_SIZE {
        return Err(ElfError::BadPhentsize { phentsize });
    }
    for index in 0..phnum {
        let offset = phoff.saturating_add(index * PHDR_SIZE);
        let p_type = u32_at(image, offset)?;
        bytes(image, offset, PHDR_SIZE)?;
        if p_type == PT_INTERP || p_type == PT_DYNAMIC {
            return Err(ElfError::DynamicSegment { index, p_type });
        }
    }
    Ok(phnum)
}

fn bytes(image: &[u8], offset: usize, len: usize) -> Result<&[u8], ElfError> {
    offset
        .checked_add(len)
        .and_then(|end| image.get(offset..end))
        .ok_or(ElfError::Truncated { offset, len: image.len() })
}

fn u16_at(image: &[u8], offset: usize) -> Result<u16, ElfError> {
    Ok(u16::from_le_bytes(bytes(image, offset, 2)?.try_into().expect("2 bytes")))
}

fn u32_at(image: &[u8], offset: usize) -> Result<u32, ElfError> {
    Ok(u32::from_le_bytes(bytes(image, offset, 4)?.try_into().expect("4 bytes")))
}

fn u64_at(image: &[u8], offset: usize) -> Result<u64, ElfError> {
    Ok(u64::from_le_bytes(bytes(image, offset, 8)?.try_into().expect("8 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PT_LOAD: u32 = 1;

    /// A minimal ELF image: a header followed directly by program headers of the given types.
    fn image(e_type: u16, p_types: &[u32]) -> Vec<u8> {
        let mut img = vec![0u8; EHDR_SIZE + p_types.len() * PHDR_SIZE];
        img[..4].copy_from_slice(&ELF_MAGIC);
        img[4] = ELFCLASS64;
        img[5] = ELFDATA2LSB;
        img[16..18].copy_from_slice(&e_type.to_le_bytes());
        img[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        img[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        img[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        img[56..58].copy_from_slice(&(p_types.len() as u16).to_le_bytes());
        for (i, p_type) in p_types.iter().enumerate() {
            let at = EHDR_SIZE + i * PHDR_SIZE;
            img[at..at + 4].copy_from_slice(&p_type.to_le_bytes());
        }
        img
    }

    #[test]
    fn static_exec_accepted() {
        assert_eq!(check_static_executable(&image(ET_EXEC, &[PT_LOAD, PT_LOAD])), Ok(2));
    }

    #[test]
    fn static_check_catches_pie_interp_dynamic_and_garbage() {
        const ET_DYN: u16 = 3;
        assert_eq!(check_static_executable(&image(ET_DYN, &[PT_LOAD])), Err(ElfError::NotExec { e_type: 3 }));
        assert_eq!(
            check_static_executable(&image(ET_EXEC, &[PT_LOAD, PT_INTERP])),
            Err(ElfError::DynamicSegment { index: 1, p_type: PT_INTERP })
        );
        assert_eq!(
            check_static_executable(&image(ET_EXEC, &[PT_DYNAMIC])),
            Err(ElfError::DynamicSegment { index: 0, p_type: PT_DYNAMIC })
        );
        let mut truncated = image(ET_EXEC, &[PT_LOAD]);
        truncated.truncate(EHDR_SIZE + 10);
        assert!(matches!(check_static_executable(&truncated), Err(ElfError::Truncated { .. })));
        assert!(matches!(check_static_executable(b"#!/bin/sh\n"), Err(ElfError::NotElf64 { .. })));
        let mut elf32 = image(ET_EXEC, &[]);
        elf32[4] = 1; // ELFCLASS32
        assert!(matches!(check_static_executable(&elf32), Err(ElfError::NotElf64 { .. })));
        let mut wrong_machine = image(ET_EXEC, &[]);
        wrong_machine[18] = 183; // EM_AARCH64
        assert!(matches!(check_static_executable(&wrong_machine), Err(ElfError::NotElf64 { .. })));
    }

    #[test]
    fn static_check_reads_a_real_dynamic_binary_as_dynamic() {
        // The test binary itself is linked against libc, so it must be rejected one way or another.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(check_static_executable(&me).is_err());
    }
}
