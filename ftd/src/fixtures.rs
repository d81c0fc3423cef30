//! Test fixtures shared by the unit tests: node-a of a pair (its peer
//! node-b) whose store holds VM vm1 at level ft, running with its primary
//! on node-a.

use std::path::Path;

use crate::config::{Config, NodeAddresses};
use crate::model::{Desired, Level, VmDefinition};
use crate::store::Store;

fn addresses(name: &str, port: u16) -> NodeAddresses {
    NodeAddresses {
        name: name.into(),
        api: format!("127.0.0.1:{port}").parse().unwrap(),
        pair: format!("127.0.0.1:{}", port + 1).parse().unwrap(),
        alink: vec![],
    }
}

/// node-a's configuration, with node-b as its peer.
pub fn pair_config() -> Config {
    let mut config = Config::new(addresses("node-a", 1));
    config.peer = Some(addresses("node-b", 3));
    config
}

/// VM `name` at level ft, preferring node-a, without disks or NICs.
pub fn definition(name: &str) -> VmDefinition {
    VmDefinition {
        name: name.into(),
        vcpus: 1,
        memory_mib: 128,
        kernel: "/k".into(),
        initrd: None,
        cmdline: String::new(),
        disks: vec![],
        nics: vec![],
        level: Level::Ft,
        preferred_node: "node-a".into(),
        ft: Default::default(),
        slot: 0,
    }
}

/// node-a's store in `dir` with vm1 running, its primary on node-a.
pub fn store_with_vm(dir: &Path) -> Store {
    let store = Store::open(&dir.join("db"), "node-a").unwrap();
    store.create_vm(&definition("vm1")).unwrap();
    store
        .update_vm("vm1", |r| {
            r.desired = Desired::Running;
            r.primary_node = Some("node-a".into());
        })
        .unwrap();
    store
}
