pub mod cluster;
pub mod fault_proxy;
