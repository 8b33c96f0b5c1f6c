//! A local Dataverse Web API emulator (feature `emulator`). STUB: being written.
