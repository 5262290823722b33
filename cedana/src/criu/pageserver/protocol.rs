//! The messages of CRIU's page-server protocol that a lazy restore uses: CRIU's `lazy-pages` daemon asks
//! for pages with `PS_IOV_GET` and ends with `PS_IOV_CLOSE` (or `PS_IOV_FORCE_CLOSE` on a socket it was
//! handed); the server answers a request with `PS_IOV_ADD_F` and the pages' bytes, and a close with a
//! 32-bit status.
//!
//! Every message is CRIU's `struct page_server_iov` as the C compiler lays it out on x86-64: a u32 command
//! (flags in its upper 16 bits), 4 bytes of padding, then u64 page count, u64 address and u64 id (the
//! virtual PID of the process the pages belong to), little-endian: 32 bytes.

/// Size of one message.
pub const IOV_SIZE: usize = 32;

/// Pages follow the message (with flags).
pub const PS_IOV_ADD_F: u32 = 6;
/// A request for pages.
pub const PS_IOV_GET: u32 = 7;
/// The end of a session: answered with a status.
pub const PS_IOV_CLOSE: u32 = 0x1023;
/// The end of a session on a socket the client was handed (`--ps-socket`): answered the same.
pub const PS_IOV_FORCE_CLOSE: u32 = 0x1024;

/// The page flag CRIU sets on pages whose data follows (`PE_PRESENT`).
pub const PE_PRESENT: u32 = 1 << 2;

const CMD_BITS: u32 = 16;
const CMD_MASK: u32 = (1 << CMD_BITS) - 1;

/// One `page_server_iov`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iov {
    /// The command, without its flags.
    pub cmd: u32,
    /// The flags in the command's upper bits.
    pub flags: u32,
    pub nr_pages: u64,
    pub vaddr: u64,
    /// The virtual PID of the process whose pages these are.
    pub dst_id: u64,
}

impl Iov {
    /// Decode a message.
    pub fn decode(b: &[u8; IOV_SIZE]) -> Iov {
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let raw = u32_at(0);
        Iov { cmd: raw & CMD_MASK, flags: raw >> CMD_BITS, nr_pages: u64_at(8), vaddr: u64_at(16), dst_id: u64_at(24) }
    }

    /// Encode a message.
    pub fn encode(&self) -> [u8; IOV_SIZE] {
        let mut b = [0u8; IOV_SIZE];
        b[0..4].copy_from_slice(&((self.flags << CMD_BITS) | (self.cmd & CMD_MASK)).to_le_bytes());
        b[8..16].copy_from_slice(&self.nr_pages.to_le_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_le_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_le_bytes());
        b
    }
}
