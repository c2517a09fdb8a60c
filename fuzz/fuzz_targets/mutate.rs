//! Shared by the targets: apply the fuzzer's bytes as edits to a valid value, so that the
//! fuzzer explores near-valid inputs (tokens, cursors, blobs) without a committed seed corpus.
//! Each edit is 4 bytes: kind, position (2 bytes, big-endian), byte.
pub fn apply(valid: &[u8], script: &[u8]) -> Vec<u8> {
    let mut out = valid.to_vec();
    for op in script.chunks_exact(4) {
        let pos = usize::from(u16::from_be_bytes([op[1], op[2]]));
        match op[0] % 4 {
            0 if !out.is_empty() => {
                let i = pos % out.len();
                out[i] = op[3];
            }
            1 => {
                let i = pos % (out.len() + 1);
                out.insert(i, op[3]);
            }
            2 if !out.is_empty() => {
                let i = pos % out.len();
                let n = usize::from(op[3] % 8) + 1;
                out.drain(i..(i + n).min(out.len()));
            }
            3 => out.truncate(pos % (out.len() + 1)),
            _ => {}
        }
    }
    out
}
