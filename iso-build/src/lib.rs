//! Builds the bootable Allod appliance ISO (Debian base, kernel, libvirt,
//! QEMU, nftables, the `allod` binary, its service unit and the console TUI on
//! tty1) and the test that boots it.
//!
//! Nothing is implemented yet.
