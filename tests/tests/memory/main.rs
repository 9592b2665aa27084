//! The tests that read the test process's own RSS: apart from the others (whose hosts would
//! grow it), and one at a time among themselves (`measuring_memory`).

mod backing_off;
mod cycles;
mod stalled_tail;
