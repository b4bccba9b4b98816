//! A native plugin as an older `canopy-plugin` would have built it: its table says ABI
//! version 0. Hosts read only that first field and must refuse the library, naming both
//! versions. Nothing else of the table is ever read, so it carries no callbacks.

/// The start of every plugin table: the ABI version.
#[repr(C)]
pub struct TableHeader {
    /// The ABI version this library was built against.
    pub abi_version: u32,
}

static TABLE: TableHeader = TableHeader { abi_version: 0 };

/// The entry point, as every version of the ABI names it.
#[allow(unsafe_code)]
// SAFETY: exported under the one name hosts look up, with the C ABI and no arguments.
#[unsafe(no_mangle)]
pub extern "C" fn canopy_plugin_entry() -> *const TableHeader {
    &TABLE
}
