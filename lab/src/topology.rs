//! The shape of a lab: its nodes, links, addresses, ports and files.
//!
//! A lab is named; its index (0 for the default lab) keeps the bridges,
//! subnets and ports of several labs on one host apart.
//!
//! | what                  | address                          |
//! |-----------------------|----------------------------------|
//! | business network      | 10.77.<index>.0/24, host .1, node a .11, node b .12 |
//! | A-link                | 10.78.<index>.0/24, node a .1, node b .2 |
//! | management (agent)    | 127.0.0.1:<17000 + 20*index + 1 + node> on the host |

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::agent::AGENT_PORT;

/// A node of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeId {
    A,
    B,
}

impl NodeId {
    pub const ALL: [NodeId; 2] = [NodeId::A, NodeId::B];

    pub fn index(self) -> u8 {
        match self {
            NodeId::A => 0,
            NodeId::B => 1,
        }
    }

    pub fn peer(self) -> NodeId {
        match self {
            NodeId::A => NodeId::B,
            NodeId::B => NodeId::A,
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeId::A => "a",
            NodeId::B => "b",
        })
    }
}

impl FromStr for NodeId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "a" => Ok(NodeId::A),
            "b" => Ok(NodeId::B),
            other => Err(format!("unknown node {other:?}: the lab has nodes a and b")),
        }
    }
}

/// A network that joins the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkId {
    /// The dedicated link between the nodes (checkpoint traffic, heartbeats).
    Alink,
    /// The business network: nodes, guests and clients on the outer host.
    Biz,
}

impl LinkId {
    pub const ALL: [LinkId; 2] = [LinkId::Alink, LinkId::Biz];

    /// The id of the node's network device for this link (used with QMP).
    pub fn device_id(self) -> &'static str {
        match self {
            LinkId::Alink => "alink0",
            LinkId::Biz => "biz0",
        }
    }
}

impl fmt::Display for LinkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkId::Alink => "alink",
            LinkId::Biz => "biz",
        })
    }
}

impl FromStr for LinkId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "alink" | "a-link" => Ok(LinkId::Alink),
            "biz" | "business" => Ok(LinkId::Biz),
            other => Err(format!(
                "unknown link {other:?}: the lab has links alink and biz"
            )),
        }
    }
}

/// Network cards of a node; the last byte of each MAC names its role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nic {
    Mgmt = 1,
    Alink = 2,
    Biz = 3,
}

/// Where and how a named lab lives on this host.
#[derive(Debug, Clone)]
pub struct Topology {
    pub name: String,
    pub index: u8,
    pub dir: PathBuf,
    pub node_mem_mib: u32,
    pub disk_size_mib: u64,
    /// The nodes' daemons are set up with the A-link in plaintext (`ftd
    /// init --alink-plaintext`, as for a dedicated cable) instead of
    /// sealed. Read when a node first boots on a fresh disk.
    pub alink_plaintext: bool,
    /// The nodes' daemons are given the lab's quorum witness (on the host).
    /// Without one, a takeover is decided by silence alone: a partition
    /// leaves two active copies (the split-brain tests). Read when a node
    /// first boots on a fresh disk.
    pub witness: bool,
}

/// The name of the lab that `ftctl lab` uses when none is given.
pub const DEFAULT_LAB: &str = "lab";
/// The port of each node's ftd API (images/node/rcS).
pub const API_PORT: u16 = 7200;
/// The port of the lab's witness on the host's business address.
pub const WITNESS_PORT: u16 = 7300;

impl Topology {
    /// The topology of lab `name`, with its files under `$FTLAB_DIR/<name>`
    /// (default `/var/tmp/ftlab/<name>`).
    pub fn new(name: &str) -> Result<Self, String> {
        let valid = !name.is_empty()
            && name.len() <= 16
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(format!(
                "bad lab name {name:?}: use 1-16 characters of a-z, 0-9 and '-'"
            ));
        }
        let index = if name == DEFAULT_LAB {
            0
        } else {
            1 + (crc32fast::hash(name.as_bytes()) % 200) as u8
        };
        let root = std::env::var_os("FTLAB_DIR")
            .map_or_else(|| PathBuf::from("/var/tmp/ftlab"), PathBuf::from);
        Ok(Topology {
            name: name.to_string(),
            index,
            dir: root.join(name),
            node_mem_mib: 1536,
            disk_size_mib: 4096,
            alink_plaintext: false,
            witness: true,
        })
    }

    fn port_base(&self) -> u16 {
        17000 + 20 * u16::from(self.index)
    }

    /// The host port forwarded to the node's agent over its management NIC.
    pub fn mgmt_addr(&self, node: NodeId) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::LOCALHOST,
            self.port_base() + 1 + u16::from(node.index()),
        ))
    }

    /// The UDP port the node's A-link NIC sends from (QEMU socket netdev).
    pub fn alink_udp_port(&self, node: NodeId) -> u16 {
        self.port_base() + 11 + u16::from(node.index())
    }

    pub fn bridge(&self) -> String {
        format!("ftbr{}", self.index)
    }

    pub fn tap(&self, node: NodeId) -> String {
        format!("ftl{}{}", self.index, node)
    }

    pub fn host_biz_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.index, 1)
    }

    pub fn biz_ip(&self, node: NodeId) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.index, 11 + node.index())
    }

    pub fn alink_ip(&self, node: NodeId) -> Ipv4Addr {
        Ipv4Addr::new(10, 78, self.index, 1 + node.index())
    }

    /// The node's agent as reached over the business network.
    pub fn biz_agent_addr(&self, node: NodeId) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.biz_ip(node), AGENT_PORT))
    }

    /// The peer's agent as reached from `node` over the A-link.
    pub fn alink_agent_addr(&self, node: NodeId) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.alink_ip(node), AGENT_PORT))
    }

    pub fn mac(&self, node: NodeId, nic: Nic) -> String {
        format!(
            "52:54:00:{:02x}:{:02x}:{:02x}",
            self.index,
            node.index(),
            nic as u8
        )
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn console_log(&self, node: NodeId) -> PathBuf {
        self.dir.join(format!("node-{node}.console.log"))
    }

    pub fn qmp_socket(&self, node: NodeId) -> PathBuf {
        self.dir.join(format!("node-{node}.qmp"))
    }

    pub fn pid_file(&self, node: NodeId) -> PathBuf {
        self.dir.join(format!("node-{node}.pid"))
    }

    /// The lab pair's secret (mode 0600), given to both nodes' daemons.
    pub fn pair_secret_file(&self) -> PathBuf {
        self.dir.join("pair-secret")
    }

    /// The bearer token of both nodes' API (mode 0600): what
    /// `FTCTL_TOKEN_FILE` names for the lab.
    pub fn api_token_file(&self) -> PathBuf {
        self.dir.join("api-token")
    }

    /// The API of `node`'s daemon (on the business network, which is the
    /// lab's management network too).
    pub fn api_url(&self, node: NodeId) -> String {
        format!("http://{}:{}", self.biz_ip(node), API_PORT)
    }

    /// The lab's quorum witness (on the outer host, business network).
    pub fn witness_addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.host_biz_ip(), WITNESS_PORT))
    }

    /// Where the witness keeps its records.
    pub fn witness_dir(&self) -> PathBuf {
        self.dir.join("witness")
    }

    pub fn witness_log(&self) -> PathBuf {
        self.dir.join("witness.log")
    }

    pub fn witness_pid_file(&self) -> PathBuf {
        self.dir.join("witness.pid")
    }

    pub fn disk(&self, node: NodeId) -> PathBuf {
        self.dir.join(format!("node-{node}.disk.ext4"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labs_do_not_share_addresses_or_ports() {
        let a = Topology::new("lab").unwrap();
        let b = Topology::new("e2e").unwrap();
        assert_eq!(a.index, 0);
        assert_ne!(a.index, b.index);
        assert_ne!(a.bridge(), b.bridge());
        assert_ne!(a.mgmt_addr(NodeId::A), b.mgmt_addr(NodeId::A));
        assert_ne!(a.mgmt_addr(NodeId::A), a.mgmt_addr(NodeId::B));
        assert_ne!(a.biz_ip(NodeId::A), a.biz_ip(NodeId::B));
        assert!(
            a.tap(NodeId::B).len() < 16,
            "interface names are at most 15 bytes"
        );
        assert!(Topology::new("x".repeat(17).as_str()).is_err());
        assert!(Topology::new("Bad/Name").is_err());
    }

    #[test]
    fn names_parse() {
        assert_eq!("a".parse::<NodeId>().unwrap(), NodeId::A);
        assert!("c".parse::<NodeId>().is_err());
        assert_eq!("alink".parse::<LinkId>().unwrap(), LinkId::Alink);
        assert!("wan".parse::<LinkId>().is_err());
        assert_eq!(
            Topology::new("lab").unwrap().mac(NodeId::B, Nic::Biz),
            "52:54:00:00:01:03"
        );
    }
}
