//! Whether an executable needs a dynamic loader: `meshd install-cni`
//! installs only CNI plugins that do not, since they run on the host, whose
//! libc (version, or glibc at all) is not the one they were built against.
//! Pure: reads the ELF program headers from bytes.

/// How an executable is linked, from its program headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linking {
    /// No program interpreter: runs with no libc on the host.
    Static,
    /// Loaded by `interpreter` (e.g. `/lib64/ld-linux-x86-64.so.2`).
    Dynamic { interpreter: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not a 64-bit little-endian ELF executable")]
    NotElf64,
    #[error("truncated ELF: {0} lies beyond the end of the file")]
    Truncated(&'static str),
}

/// `PT_INTERP`: the program header naming the dynamic loader.
const PT_INTERP: u32 = 3;

fn bytes<const N: usize>(elf: &[u8], at: u64, what: &'static str) -> Result<[u8; N], ElfError> {
    usize::try_from(at)
        .ok()
        .and_then(|at| elf.get(at..at.checked_add(N)?))
        .and_then(|b| b.try_into().ok())
        .ok_or(ElfError::Truncated(what))
}

/// How the ELF executable `elf` is linked.
pub fn linking(elf: &[u8]) -> Result<Linking, ElfError> {
    // Magic, ELFCLASS64, ELFDATA2LSB: what every Linux target Weft builds for is.
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return Err(ElfError::NotElf64);
    }
    let phoff = u64::from_le_bytes(bytes(elf, 0x20, "e_phoff")?);
    let phentsize = u64::from(u16::from_le_bytes(bytes(elf, 0x36, "e_phentsize")?));
    let phnum = u64::from(u16::from_le_bytes(bytes(elf, 0x38, "e_phnum")?));
    for i in 0..phnum {
        let header = phoff.saturating_add(i.saturating_mul(phentsize));
        if u32::from_le_bytes(bytes(elf, header, "a program header")?) != PT_INTERP {
            continue;
        }
        let offset = u64::from_le_bytes(bytes(elf, header + 8, "p_offset")?);
        let size = u64::from_le_bytes(bytes(elf, header + 32, "p_filesz")?);
        let name = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(size).ok())
            .and_then(|(o, s)| elf.get(o..o.checked_add(s)?))
            .ok_or(ElfError::Truncated("the interpreter's name"))?;
        let interpreter = String::from_utf8_lossy(name)
            .trim_end_matches('\0')
            .to_string();
        return Ok(Linking::Dynamic { interpreter });
    }
    Ok(Linking::Static)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF64 header with program headers of `types` at 64, 56 bytes
    /// each, and the interpreter's name after them.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut out = vec![0u8; 64];
        out[..6].copy_from_slice(b"\x7fELF\x02\x01");
        out[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        out[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        out[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        let name = b"/lib/ld-musl-x86_64.so.1\0";
        let name_at = 64 + 56 * types.len() as u64;
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            ph[8..16].copy_from_slice(&name_at.to_le_bytes());
            ph[32..40].copy_from_slice(&(name.len() as u64).to_le_bytes());
            out.extend(ph);
        }
        out.extend(name);
        out
    }

    #[test]
    fn the_interpreter_header_makes_an_executable_dynamic() {
        let musl = Linking::Dynamic {
            interpreter: "/lib/ld-musl-x86_64.so.1".into(),
        };
        // PT_LOAD 1, PT_DYNAMIC 2 (a static-pie has one), PT_INTERP 3.
        for (types, want) in [
            (&[][..], Ok(Linking::Static)),
            (&[1, 2, 6][..], Ok(Linking::Static)),
            (&[6, 3, 1][..], Ok(musl.clone())),
        ] {
            assert_eq!(linking(&elf(types)), want, "{types:?}");
        }
        let mut cut = elf(&[1, 3]);
        cut.truncate(64 + 56 + 10);
        assert_eq!(linking(&cut), Err(ElfError::Truncated("p_offset")));
        cut.truncate(100);
        assert_eq!(linking(&cut), Err(ElfError::Truncated("a program header")));
        assert_eq!(linking(b"#!/bin/sh\n"), Err(ElfError::NotElf64));
        assert_eq!(
            linking(&elf(&[3])[..0x30]),
            Err(ElfError::Truncated("e_phentsize"))
        );
    }

    /// This test binary, linked as the workspace links by default.
    #[test]
    fn a_default_build_is_dynamic() {
        let me = std::fs::read("/proc/self/exe").unwrap();
        assert!(
            matches!(linking(&me), Ok(Linking::Dynamic { interpreter }) if interpreter.contains("ld-linux")),
        );
    }
}
