//! The lab: a two-node FT pair on one machine.
//!
//! Each node is a QEMU TCG virtual machine with emulated AMD SVM, so real
//! `kvm_amd` runs inside it (the outer host's `/dev/kvm` may be a software
//! hypervisor that cannot boot stock guests). The nodes are joined by an
//! A-link (a UDP socket netdev between the two QEMUs) and attached to a
//! business network (a bridge on the outer host with one TAP per node). Each
//! has its own local disk and a management NIC on which our agent answers.
//!
//! On real servers the same roles are: node = server, A-link = the dedicated
//! cable between them, business network = the LAN, agent = ssh.

pub mod agent;
pub mod drill;
pub mod ft_pair;
pub mod host_net;
pub mod images;
pub mod lab;
pub mod qemu;
pub mod qmp;
pub mod smoke;
pub mod topology;
pub mod witness;

pub use lab::{Lab, LabError};
pub use topology::{LinkId, NodeId, Topology};
