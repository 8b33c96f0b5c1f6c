//! Dataverse Web API wire format (feature `dataverse`): how keys are written in URLs, and what the service's
//! errors mean. The HTTP adapter (`DataverseStore`) builds on these; they are public so that other clients and
//! tests can use the same rules.
//!
//! Facts and their sources are collected in the project's Dataverse reference; where the service's behaviour is
//! not documented, the guesses are marked in the code.

pub mod odata;
pub mod response;
