//! COM1 (I/O port 0x3f8): the kernel's only output. Bochs writes it to a file (`com1: mode=file`), which
//! `cargo xtask bochs` reads for the `TDP-RESULT` line.
//!
//! Polled, 8N1, FIFO on; each byte waits for the transmit-holding register to empty, and [`flush`] waits
//! for the transmitter to go idle before Bochs is shut down, or the tail of the output is lost.

use core::arch::asm;
use core::fmt;

const COM1: u16 = 0x3f8;
/// Line status register: transmit-holding register empty (bit 5), transmitter empty (bit 6).
const LSR_THRE: u8 = 1 << 5;
const LSR_TEMT: u8 = 1 << 6;

/// Writes `value` to I/O port `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: the ports this kernel writes (COM1's registers, Bochs's shutdown port 0x8900) are device
    // registers with no effect on memory.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads I/O port `port`.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: reading COM1's line status register has no side effect on memory.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Programs COM1: 115200 baud (divisor 1), 8 data bits, no parity, one stop bit, FIFO enabled and
/// cleared, interrupts off.
pub fn init() {
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x80);
    outb(COM1, 0x01);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0xc7);
    outb(COM1 + 4, 0x03);
}

fn write_byte(b: u8) {
    while inb(COM1 + 5) & LSR_THRE == 0 {}
    outb(COM1, b);
}

/// Waits until every byte written has left the transmitter.
pub fn flush() {
    while inb(COM1 + 5) & LSR_TEMT == 0 {}
}

/// A `fmt::Write` over COM1 (LF becomes CRLF is not needed: the output is read as a file).
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(write_byte);
        Ok(())
    }
}

/// Prints to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::serial::Serial, format_args!($($arg)*));
    }};
}

/// Prints a line to COM1.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        $crate::print!($($arg)*);
        $crate::print!("\n");
    }};
}
