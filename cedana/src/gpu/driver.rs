//! The CUDA driver API's checkpoint functions (`cuCheckpointProcess*`, CUDA 12.8 / driver r570) as a
//! [`GpuBackend`], from libcuda loaded at run time: nothing of CUDA is needed to build, and a host without
//! the library (or with an older one, lacking the functions) simply does not offer this backend.

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::path::Path;
use std::time::Duration;

use super::backend::{Action, CudaState, GpuBackend};
use super::placement::GpuPair;
use super::GpuError;

/// CUDA 12.8, the first with the checkpoint functions (display driver r570).
pub const MIN_DRIVER_API_VERSION: c_int = 12080;

/// `CUcheckpointLockArgs`.
#[repr(C)]
struct LockArgs {
    timeout_ms: c_uint,
    reserved0: c_uint,
    reserved1: [u64; 7],
}

/// `CUcheckpointGpuPair`: a checkpointed GPU and the GPU to restore onto, as `CUuuid`s.
#[repr(C)]
struct GpuPairArg {
    old_uuid: [u8; 16],
    new_uuid: [u8; 16],
}

/// `CUcheckpointRestoreArgs` of cuda.h since GPU remapping: `gpuPairs`, `gpuPairsCount`, then reserved
/// (zeroed). CUDA 12.8's version is all reserved: there, pairs are refused as non-zero reserved fields.
#[repr(C)]
struct RestoreArgs {
    gpu_pairs: *mut GpuPairArg,
    gpu_pairs_count: c_uint,
    reserved: [u8; 52 - std::mem::size_of::<*mut GpuPairArg>()],
    reserved1: u64,
}

// The driver reads 64 bytes of arguments.
const _: () = assert!(std::mem::size_of::<RestoreArgs>() == 64 && std::mem::size_of::<GpuPairArg>() == 32);

/// `CUDA_ERROR_INVALID_VALUE`.
const CUDA_ERROR_INVALID_VALUE: c_int = 1;

/// `CUcheckpointCheckpointArgs`, `CUcheckpointUnlockArgs`: reserved, zeroed.
#[repr(C)]
struct ReservedArgs {
    reserved: [u64; 8],
}

type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetState = unsafe extern "C" fn(c_int, *mut c_int) -> c_int;
type Lock = unsafe extern "C" fn(c_int, *mut LockArgs) -> c_int;
type Other = unsafe extern "C" fn(c_int, *mut ReservedArgs) -> c_int;
type Restore = unsafe extern "C" fn(c_int, *mut RestoreArgs) -> c_int;
type ErrorName = unsafe extern "C" fn(c_int, *mut *const c_char) -> c_int;
type Init = unsafe extern "C" fn(c_uint) -> c_int;

/// `CUDA_ERROR_NOT_FOUND`: the PID is not a CUDA process.
const CUDA_ERROR_NOT_FOUND: c_int = 500;

/// libcuda's checkpoint functions.
pub struct DriverApi {
    // The functions below point into the library: it stays loaded as long as they are used.
    _lib: libloading::Library,
    version: c_int,
    get_state: GetState,
    lock: Lock,
    checkpoint: Other,
    restore: Restore,
    unlock: Other,
    error_name: Option<ErrorName>,
    init: Init,
    /// The result of `cuInit` in this process, called before the first restore (the driver restores a
    /// process only for a caller that initialised CUDA, unless persistence mode is on).
    initialised: std::sync::OnceLock<c_int>,
}

impl DriverApi {
    /// Load `library` (e.g. `libcuda.so.1`, found by the dynamic loader, or a path) and check that it has
    /// the checkpoint functions of CUDA 12.8 or newer.
    pub fn load(library: &Path) -> Result<Self, GpuError> {
        let no = |reason: String| GpuError::NoBackend { reason };
        // SAFETY: loading libcuda runs its initialisers, which is what every CUDA program does.
        let lib =
            unsafe { libloading::Library::new(library) }.map_err(|e| no(format!("cannot load {}: {e}", library.display())))?;
        // SAFETY: each symbol is declared with the signature of CUDA's cuda.h for that name.
        unsafe {
            let sym = |name: &str| -> Result<*const (), GpuError> {
                let s: libloading::Symbol<*const ()> = lib.get(name.as_bytes()).map_err(|_| GpuError::DriverTooOld {
                    detail: format!("{} has no {name} (CUDA 12.8 / driver r570 added it)", library.display()),
                })?;
                Ok(*s)
            };
            let get_version: GetVersion = std::mem::transmute(sym("cuDriverGetVersion")?);
            let mut version = 0;
            let rc = get_version(&mut version);
            if rc != 0 {
                return Err(no(format!("cuDriverGetVersion failed with CUDA error {rc}")));
            }
            if version < MIN_DRIVER_API_VERSION {
                return Err(GpuError::DriverTooOld {
                    detail: format!(
                        "the CUDA driver supports CUDA {}.{}, and checkpointing needs 12.8 (driver r570) or newer",
                        version / 1000,
                        version % 1000 / 10
                    ),
                });
            }
            let api = DriverApi {
                version,
                get_state: std::mem::transmute::<*const (), GetState>(sym("cuCheckpointProcessGetState")?),
                lock: std::mem::transmute::<*const (), Lock>(sym("cuCheckpointProcessLock")?),
                checkpoint: std::mem::transmute::<*const (), Other>(sym("cuCheckpointProcessCheckpoint")?),
                restore: std::mem::transmute::<*const (), Restore>(sym("cuCheckpointProcessRestore")?),
                unlock: std::mem::transmute::<*const (), Other>(sym("cuCheckpointProcessUnlock")?),
                error_name: sym("cuGetErrorName").ok().map(|p| std::mem::transmute::<*const (), ErrorName>(p)),
                init: std::mem::transmute::<*const (), Init>(sym("cuInit")?),
                initialised: std::sync::OnceLock::new(),
                _lib: lib,
            };
            Ok(api)
        }
    }

    /// The CUDA version the driver supports, e.g. `12.8`.
    pub fn cuda_version(&self) -> String {
        format!("{}.{}", self.version / 1000, self.version % 1000 / 10)
    }

    /// `CUDA_ERROR_...` for a result code (its number when the driver cannot name it).
    fn describe(&self, rc: c_int) -> String {
        let mut name: *const c_char = std::ptr::null();
        if let Some(f) = self.error_name {
            // SAFETY: cuGetErrorName writes a pointer to a static string, or leaves it null.
            if unsafe { f(rc, &mut name) } == 0 && !name.is_null() {
                // SAFETY: the driver's error names are static NUL-terminated strings.
                return unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
            }
        }
        format!("CUDA error {rc}")
    }
}

impl GpuBackend for DriverApi {
    fn name(&self) -> &'static str {
        "driver"
    }

    fn can_remap(&self, pairs: &[super::GpuPair]) -> Result<(), GpuError> {
        match pairs.iter().find(|p| GpuPair::uuid_bytes(&p.old).is_none() || GpuPair::uuid_bytes(&p.new).is_none()) {
            Some(bad) => Err(GpuError::NoRemap {
                backend: self.name(),
                pairs: super::backend::describe_pairs(pairs),
                detail: format!(
                    "{} -> {} is not a pair of GPU UUIDs (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)",
                    bad.old, bad.new
                ),
            }),
            None => Ok(()),
        }
    }

    fn restore_onto(&self, pid: i32, pairs: &[super::GpuPair]) -> Result<(), GpuError> {
        self.can_remap(pairs)?;
        let mut args_pairs: Vec<GpuPairArg> = pairs
            .iter()
            .filter_map(|p| Some(GpuPairArg { old_uuid: GpuPair::uuid_bytes(&p.old)?, new_uuid: GpuPair::uuid_bytes(&p.new)? }))
            .collect();
        let mut args = RestoreArgs {
            gpu_pairs: if args_pairs.is_empty() { std::ptr::null_mut() } else { args_pairs.as_mut_ptr() },
            gpu_pairs_count: args_pairs.len() as c_uint,
            reserved: [0; 52 - std::mem::size_of::<*mut GpuPairArg>()],
            reserved1: 0,
        };
        // SAFETY: cuInit takes flags 0; the restore reads the args struct and `gpuPairsCount` pairs from
        // `args_pairs`, which outlives the call.
        let rc = unsafe {
            let init = *self.initialised.get_or_init(|| (self.init)(0));
            if init != 0 {
                tracing::warn!(error = %self.describe(init), "cuInit failed: the restore works only with persistence mode on");
            }
            (self.restore)(pid, &mut args)
        };
        match rc {
            0 => Ok(()),
            CUDA_ERROR_NOT_FOUND => Err(GpuError::NotCuda { pid, detail: self.describe(rc) }),
            CUDA_ERROR_INVALID_VALUE if !pairs.is_empty() => Err(GpuError::Action {
                pid,
                action: "restore",
                message: format!(
                    "{} with GPU pairs {}: a driver whose restore arguments have no gpuPairs (CUDA 12.8's) refuses them",
                    self.describe(rc),
                    super::backend::describe_pairs(pairs)
                ),
            }),
            _ => Err(GpuError::Action { pid, action: "restore", message: self.describe(rc) }),
        }
    }

    fn state(&self, pid: i32) -> Result<CudaState, GpuError> {
        let mut state: c_int = -1;
        // SAFETY: the function writes one CUprocessState (an int-sized enum).
        let rc = unsafe { (self.get_state)(pid, &mut state) };
        if rc != 0 {
            return Err(GpuError::NotCuda { pid, detail: self.describe(rc) });
        }
        match state {
            0 => Ok(CudaState::Running),
            1 => Ok(CudaState::Locked),
            2 => Ok(CudaState::Checkpointed),
            3 => Ok(CudaState::Failed),
            other => Err(GpuError::Action { pid, action: "get-state", message: format!("unknown CUDA state {other}") }),
        }
    }

    fn act(&self, pid: i32, action: Action, timeout: Option<Duration>) -> Result<(), GpuError> {
        let mut reserved = ReservedArgs { reserved: [0; 8] };
        // SAFETY: each function takes the PID and its zero-initialised argument struct, as cuda.h declares.
        let rc = unsafe {
            match action {
                Action::Lock => {
                    let ms = timeout.map(|t| t.as_millis().clamp(1, u32::MAX as u128) as c_uint).unwrap_or(0);
                    let mut args = LockArgs { timeout_ms: ms, reserved0: 0, reserved1: [0; 7] };
                    (self.lock)(pid, &mut args)
                }
                Action::Checkpoint => (self.checkpoint)(pid, &mut reserved),
                Action::Restore => return self.restore_onto(pid, &[]),
                Action::Unlock => (self.unlock)(pid, &mut reserved),
            }
        };
        match rc {
            0 => Ok(()),
            CUDA_ERROR_NOT_FOUND => Err(GpuError::NotCuda { pid, detail: self.describe(rc) }),
            _ => Err(GpuError::Action { pid, action: action.name(), message: self.describe(rc) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_no_backend() {
        let err = DriverApi::load(Path::new("/nonexistent/libcuda.so.1")).err().unwrap();
        assert!(matches!(err, GpuError::NoBackend { .. }), "{err}");
        // A library without the checkpoint functions (any ordinary one) is a driver too old.
        let err = DriverApi::load(Path::new("libc.so.6")).err().unwrap();
        assert!(matches!(err, GpuError::DriverTooOld { .. }), "{err}");
    }
}
