//! Programs that run inside FT guests (built static, installed in the guest
//! images by `images/guest-rootfs.sh`): `ft-dirtier`, a memory dirtier with
//! a chosen rate for benchmarks; `ft-counter`; `ft-ledger`, the ledger
//! service whose acknowledged operations must survive failovers, with its
//! client and checker in [`ledger`] (used on the host by `ftctl lab drill`).

pub mod dirtier;
pub mod ledger;
pub mod pagemap;
