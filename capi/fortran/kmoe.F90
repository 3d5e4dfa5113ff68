! kmoe — the Fortran module over the C ABI (preprocessed: kmoe_typed.inc holds the procedures of
! each real kind) (capi/include/kmoe.h).
!
!   use kmoe
!   type(kmoe_layer) :: layer
!   call kmoe_initialize(status)
!   call kmoe_layer_create(layer, "sigma_moe", '{"dmodel": 16, ...}', status, seed=1_c_int64_t)
!   call kmoe_layer_forward(layer, x, .true., state, status)       ! x(n_tokens, dmodel)
!   if (status /= KMOE_OK) print *, kmoe_error_message()
!
! Arrays are Fortran arrays with the C ABI's logical shape (x(n_tokens, dmodel) is the C ABI's
! [n_tokens, dmodel]); they are passed with their column-major strides and kmoe copies them as
! needed. Arrays of any rank (assumed rank), real(c_float) for float32 layers, real(c_double) for
! float64 ones. An optional mpi_comm (the MPI communicator's integer handle) places the experts
! over its ranks. Every procedure returns a status (KMOE_OK = 0 on success).
module kmoe
  use, intrinsic :: iso_c_binding
  implicit none
  private

  integer, parameter, public :: KMOE_OK = 0, KMOE_INVALID_ARGUMENT = 1, KMOE_SHAPE_MISMATCH = 2, &
                                KMOE_NON_FINITE = 3, KMOE_IO_ERROR = 4, KMOE_OUT_OF_MEMORY = 5, &
                                KMOE_INTERNAL = 6, KMOE_CORRUPT_FILE = 7, KMOE_UNSUPPORTED = 8, &
                                KMOE_MPI_ERROR = 9
  integer(c_int), parameter, public :: KMOE_FLOAT32 = 1, KMOE_FLOAT64 = 2, KMOE_INT32 = 3
  integer(c_int), parameter :: KMOE_HOST = 0
  integer, parameter :: KMOE_MAX_RANK = 8

  type, public :: kmoe_layer
    type(c_ptr) :: handle = c_null_ptr
  end type
  type, public :: kmoe_forward
    type(c_ptr) :: handle = c_null_ptr
  end type
  type, public :: kmoe_optimizer
    type(c_ptr) :: handle = c_null_ptr
  end type

  type, bind(c) :: tensor_c
    integer(c_size_t) :: struct_size
    integer(c_int) :: dtype
    integer(c_int32_t) :: rank
    integer(c_int64_t) :: shape(KMOE_MAX_RANK)
    integer(c_int64_t) :: strides(KMOE_MAX_RANK)
    type(c_ptr) :: data
    integer(c_int) :: memory
  end type

  type, bind(c) :: layer_options_c
    integer(c_size_t) :: struct_size
    integer(c_int) :: dtype
    integer(c_int64_t) :: seed
    integer(c_int32_t) :: use_comm
    integer(c_int32_t) :: comm
  end type

  type, bind(c) :: adamw_options_c
    integer(c_size_t) :: struct_size
    real(c_double) :: lr, beta1, beta2, eps, weight_decay
  end type

  public :: kmoe_initialize, kmoe_finalize, kmoe_error_message, kmoe_version
  public :: kmoe_layer_create, kmoe_layer_open_checkpoint, kmoe_layer_destroy, kmoe_layer_load, kmoe_layer_save
  public :: kmoe_layer_parameter_count, kmoe_layer_zero_grad
  public :: kmoe_layer_get_parameter, kmoe_layer_set_parameter, kmoe_layer_get_gradient
  public :: kmoe_layer_infer, kmoe_layer_forward, kmoe_forward_output, kmoe_forward_loss, kmoe_layer_backward, kmoe_forward_destroy
  public :: kmoe_optimizer_create, kmoe_optimizer_step, kmoe_optimizer_destroy

  interface kmoe_layer_get_parameter
    module procedure get_parameter_float, get_parameter_double
  end interface
  interface kmoe_layer_set_parameter
    module procedure set_parameter_float, set_parameter_double
  end interface
  interface kmoe_layer_get_gradient
    module procedure get_gradient_float, get_gradient_double
  end interface
  interface kmoe_layer_forward
    module procedure forward_float, forward_double
  end interface
  interface kmoe_layer_infer
    module procedure infer_float, infer_double
  end interface
  interface kmoe_forward_output
    module procedure output_float, output_double
  end interface
  interface kmoe_layer_backward
    module procedure backward_float, backward_double
  end interface

  ! ---- the C ABI ----
  interface
    function c_initialize() bind(c, name="kmoe_initialize") result(s)
      import :: c_int
      integer(c_int) :: s
    end function
    function c_finalize() bind(c, name="kmoe_finalize") result(s)
      import :: c_int
      integer(c_int) :: s
    end function
    function c_last_error() bind(c, name="kmoe_last_error") result(p)
      import :: c_ptr
      type(c_ptr) :: p
    end function
    function c_version() bind(c, name="kmoe_version") result(p)
      import :: c_ptr
      type(c_ptr) :: p
    end function
    function c_strlen(p) bind(c, name="strlen") result(n)
      import :: c_ptr, c_size_t
      type(c_ptr), value :: p
      integer(c_size_t) :: n
    end function
    function c_layer_create(kind, config, options, layer) bind(c, name="kmoe_layer_create") result(s)
      import :: c_int, c_char, c_ptr, layer_options_c
      character(kind=c_char), intent(in) :: kind(*), config(*)
      type(layer_options_c), intent(in) :: options
      type(c_ptr), intent(out) :: layer
      integer(c_int) :: s
    end function
    function c_layer_open_checkpoint(path, options, layer) bind(c, name="kmoe_layer_open_checkpoint") result(s)
      import :: c_int, c_char, c_ptr, layer_options_c
      character(kind=c_char), intent(in) :: path(*)
      type(layer_options_c), intent(in) :: options
      type(c_ptr), intent(out) :: layer
      integer(c_int) :: s
    end function
    function c_layer_destroy(layer) bind(c, name="kmoe_layer_destroy") result(s)
      import :: c_int, c_ptr
      type(c_ptr), value :: layer
      integer(c_int) :: s
    end function
    function c_layer_load(layer, optimizer, path) bind(c, name="kmoe_layer_load") result(s)
      import :: c_int, c_ptr, c_char
      type(c_ptr), value :: layer, optimizer
      character(kind=c_char), intent(in) :: path(*)
      integer(c_int) :: s
    end function
    function c_layer_save(layer, optimizer, path) bind(c, name="kmoe_layer_save") result(s)
      import :: c_int, c_ptr, c_char
      type(c_ptr), value :: layer, optimizer
      character(kind=c_char), intent(in) :: path(*)
      integer(c_int) :: s
    end function
    function c_layer_parameter_count(layer, count) bind(c, name="kmoe_layer_parameter_count") result(s)
      import :: c_int, c_ptr, c_int64_t
      type(c_ptr), value :: layer
      integer(c_int64_t), intent(out) :: count
      integer(c_int) :: s
    end function
    function c_layer_zero_grad(layer) bind(c, name="kmoe_layer_zero_grad") result(s)
      import :: c_int, c_ptr
      type(c_ptr), value :: layer
      integer(c_int) :: s
    end function
    function c_layer_forward(layer, input, training, state) bind(c, name="kmoe_layer_forward") result(s)
      import :: c_int, c_ptr, c_int32_t, tensor_c
      type(c_ptr), value :: layer
      type(tensor_c), intent(in) :: input
      integer(c_int32_t), value :: training
      type(c_ptr), intent(out) :: state
      integer(c_int) :: s
    end function
    function c_layer_infer(layer, input, output) bind(c, name="kmoe_layer_infer") result(s)
      import :: c_int, c_ptr, tensor_c
      type(c_ptr), value :: layer
      type(tensor_c), intent(in) :: input, output
      integer(c_int) :: s
    end function
    function c_forward_output(state, into) bind(c, name="kmoe_forward_output") result(s)
      import :: c_int, c_ptr, tensor_c
      type(c_ptr), value :: state
      type(tensor_c), intent(in) :: into
      integer(c_int) :: s
    end function
    function c_forward_loss(state, name, value) bind(c, name="kmoe_forward_loss") result(s)
      import :: c_int, c_ptr, c_char, c_double
      type(c_ptr), value :: state
      character(kind=c_char), intent(in) :: name(*)
      real(c_double), intent(out) :: value
      integer(c_int) :: s
    end function
    function c_layer_backward(layer, state, grad_output, aux_weight, grad_input) &
        bind(c, name="kmoe_layer_backward") result(s)
      import :: c_int, c_ptr, c_double, tensor_c
      type(c_ptr), value :: layer, state
      type(tensor_c), intent(in) :: grad_output
      real(c_double), value :: aux_weight
      type(c_ptr), value :: grad_input
      integer(c_int) :: s
    end function
    function c_forward_destroy(state) bind(c, name="kmoe_forward_destroy") result(s)
      import :: c_int, c_ptr
      type(c_ptr), value :: state
      integer(c_int) :: s
    end function
    function c_adamw_options_init(options) bind(c, name="kmoe_adamw_options_init") result(s)
      import :: c_int, adamw_options_c
      type(adamw_options_c), intent(out) :: options
      integer(c_int) :: s
    end function
    function c_optimizer_create(layer, options, optimizer) bind(c, name="kmoe_optimizer_create") result(s)
      import :: c_int, c_ptr, adamw_options_c
      type(c_ptr), value :: layer
      type(adamw_options_c), intent(in) :: options
      type(c_ptr), intent(out) :: optimizer
      integer(c_int) :: s
    end function
    function c_optimizer_step(optimizer) bind(c, name="kmoe_optimizer_step") result(s)
      import :: c_int, c_ptr
      type(c_ptr), value :: optimizer
      integer(c_int) :: s
    end function
    function c_optimizer_destroy(optimizer) bind(c, name="kmoe_optimizer_destroy") result(s)
      import :: c_int, c_ptr
      type(c_ptr), value :: optimizer
      integer(c_int) :: s
    end function
  end interface

  interface
    function c_layer_get_parameter(layer, name, tensor) bind(c, name="kmoe_layer_get_parameter") result(s)
      import :: c_int, c_ptr, c_char, tensor_c
      type(c_ptr), value :: layer
      character(kind=c_char), intent(in) :: name(*)
      type(tensor_c), intent(in) :: tensor
      integer(c_int) :: s
    end function
    function c_layer_set_parameter(layer, name, tensor) bind(c, name="kmoe_layer_set_parameter") result(s)
      import :: c_int, c_ptr, c_char, tensor_c
      type(c_ptr), value :: layer
      character(kind=c_char), intent(in) :: name(*)
      type(tensor_c), intent(in) :: tensor
      integer(c_int) :: s
    end function
    function c_layer_get_gradient(layer, name, tensor) bind(c, name="kmoe_layer_get_gradient") result(s)
      import :: c_int, c_ptr, c_char, tensor_c
      type(c_ptr), value :: layer
      character(kind=c_char), intent(in) :: name(*)
      type(tensor_c), intent(in) :: tensor
      integer(c_int) :: s
    end function
  end interface

contains

  ! A NUL-terminated copy of a Fortran string.
  function c_string(text) result(out)
    character(len=*), intent(in) :: text
    character(kind=c_char, len=len(text) + 1) :: out
    out = text // c_null_char
  end function

  ! The C ABI's description of a Fortran array: its shape, column-major strides, host memory.
  function describe(data, array_shape, dtype) result(t)
    type(c_ptr), intent(in) :: data
    integer(c_int64_t), intent(in) :: array_shape(:)
    integer(c_int), intent(in) :: dtype
    type(tensor_c) :: t
    integer :: i
    t%struct_size = int(c_sizeof(t), c_size_t)
    t%dtype = dtype
    t%rank = int(size(array_shape), c_int32_t)
    t%shape = 0
    t%strides = 0
    t%data = data
    t%memory = KMOE_HOST
    do i = 1, min(size(array_shape), KMOE_MAX_RANK)
      t%shape(i) = array_shape(i)
      if (i == 1) then
        t%strides(i) = 1
      else
        t%strides(i) = t%strides(i - 1) * max(array_shape(i - 1), 1_c_int64_t)
      end if
    end do
  end function

  subroutine kmoe_initialize(status)
    integer, intent(out) :: status
    status = int(c_initialize())
  end subroutine

  subroutine kmoe_finalize(status)
    integer, intent(out) :: status
    status = int(c_finalize())
  end subroutine

  ! A C string as an allocatable Fortran string.
  function from_c(p) result(text)
    type(c_ptr), intent(in) :: p
    character(len=:), allocatable :: text
    character(kind=c_char), pointer :: chars(:)
    integer :: i, n
    n = int(c_strlen(p))
    call c_f_pointer(p, chars, [n])
    allocate(character(len=n) :: text)
    do i = 1, n
      text(i:i) = chars(i)
    end do
  end function

  ! This thread's last error message ("" after a call that succeeded).
  function kmoe_error_message() result(text)
    character(len=:), allocatable :: text
    text = from_c(c_last_error())
  end function

  function kmoe_version() result(text)
    character(len=:), allocatable :: text
    text = from_c(c_version())
  end function

  function layer_options(dtype, seed, mpi_comm) result(o)
    integer(c_int), intent(in), optional :: dtype
    integer(c_int64_t), intent(in), optional :: seed
    integer, intent(in), optional :: mpi_comm
    type(layer_options_c) :: o
    o%struct_size = int(c_sizeof(o), c_size_t)
    o%dtype = KMOE_FLOAT32
    o%seed = 0
    o%use_comm = 0
    o%comm = 0
    if (present(dtype)) o%dtype = dtype
    if (present(seed)) o%seed = seed
    if (present(mpi_comm)) then
      o%use_comm = 1
      o%comm = int(mpi_comm, c_int32_t)
    end if
  end function

  ! A layer of `kind` from a JSON config; dtype KMOE_FLOAT32 (default) or KMOE_FLOAT64.
  subroutine kmoe_layer_create(layer, kind, config_json, status, dtype, seed, mpi_comm)
    type(kmoe_layer), intent(out) :: layer
    character(len=*), intent(in) :: kind, config_json
    integer, intent(out) :: status
    integer(c_int), intent(in), optional :: dtype
    integer(c_int64_t), intent(in), optional :: seed
    integer, intent(in), optional :: mpi_comm
    status = int(c_layer_create(c_string(kind), c_string(config_json), layer_options(dtype, seed, mpi_comm), &
                                layer%handle))
  end subroutine

  subroutine kmoe_layer_open_checkpoint(layer, path, status, dtype, mpi_comm)
    type(kmoe_layer), intent(out) :: layer
    character(len=*), intent(in) :: path
    integer, intent(out) :: status
    integer(c_int), intent(in), optional :: dtype
    integer, intent(in), optional :: mpi_comm
    status = int(c_layer_open_checkpoint(c_string(path), layer_options(dtype, mpi_comm=mpi_comm), layer%handle))
  end subroutine

  subroutine kmoe_layer_destroy(layer, status)
    type(kmoe_layer), intent(inout) :: layer
    integer, intent(out) :: status
    status = int(c_layer_destroy(layer%handle))
    layer%handle = c_null_ptr
  end subroutine

  subroutine kmoe_layer_load(layer, path, status, optimizer)
    type(kmoe_layer), intent(in) :: layer
    character(len=*), intent(in) :: path
    integer, intent(out) :: status
    type(kmoe_optimizer), intent(in), optional :: optimizer
    type(c_ptr) :: opt
    opt = c_null_ptr
    if (present(optimizer)) opt = optimizer%handle
    status = int(c_layer_load(layer%handle, opt, c_string(path)))
  end subroutine

  subroutine kmoe_layer_save(layer, path, status, optimizer)
    type(kmoe_layer), intent(in) :: layer
    character(len=*), intent(in) :: path
    integer, intent(out) :: status
    type(kmoe_optimizer), intent(in), optional :: optimizer
    type(c_ptr) :: opt
    opt = c_null_ptr
    if (present(optimizer)) opt = optimizer%handle
    status = int(c_layer_save(layer%handle, opt, c_string(path)))
  end subroutine

  subroutine kmoe_layer_parameter_count(layer, count, status)
    type(kmoe_layer), intent(in) :: layer
    integer(c_int64_t), intent(out) :: count
    integer, intent(out) :: status
    status = int(c_layer_parameter_count(layer%handle, count))
  end subroutine

  subroutine kmoe_layer_zero_grad(layer, status)
    type(kmoe_layer), intent(in) :: layer
    integer, intent(out) :: status
    status = int(c_layer_zero_grad(layer%handle))
  end subroutine

  ! ---- the procedures of each real kind: kmoe_typed.inc, instantiated for c_float and c_double ----
#define KMOE_REAL real(c_float)
#define KMOE_DTYPE KMOE_FLOAT32
#define KMOE_TYPED(name) name/**/_float
#include "kmoe_typed.inc"
#undef KMOE_REAL
#undef KMOE_DTYPE
#undef KMOE_TYPED
#define KMOE_REAL real(c_double)
#define KMOE_DTYPE KMOE_FLOAT64
#define KMOE_TYPED(name) name/**/_double
#include "kmoe_typed.inc"

  ! An auxiliary loss by name ("reg_loss", "balance_loss", "router_z_loss", "total_aux_loss", "aux_loss").
  subroutine kmoe_forward_loss(state, name, value, status)
    type(kmoe_forward), intent(in) :: state
    character(len=*), intent(in) :: name
    real(c_double), intent(out) :: value
    integer, intent(out) :: status
    status = int(c_forward_loss(state%handle, c_string(name), value))
  end subroutine

  subroutine kmoe_forward_destroy(state, status)
    type(kmoe_forward), intent(inout) :: state
    integer, intent(out) :: status
    status = int(c_forward_destroy(state%handle))
    state%handle = c_null_ptr
  end subroutine

  ! ---- optimizer ----
  subroutine kmoe_optimizer_create(optimizer, layer, status, lr, weight_decay)
    type(kmoe_optimizer), intent(out) :: optimizer
    type(kmoe_layer), intent(in) :: layer
    integer, intent(out) :: status
    real(c_double), intent(in), optional :: lr, weight_decay
    type(adamw_options_c) :: o
    status = int(c_adamw_options_init(o))
    if (status /= KMOE_OK) return
    if (present(lr)) o%lr = lr
    if (present(weight_decay)) o%weight_decay = weight_decay
    status = int(c_optimizer_create(layer%handle, o, optimizer%handle))
  end subroutine

  subroutine kmoe_optimizer_step(optimizer, status)
    type(kmoe_optimizer), intent(in) :: optimizer
    integer, intent(out) :: status
    status = int(c_optimizer_step(optimizer%handle))
  end subroutine

  subroutine kmoe_optimizer_destroy(optimizer, status)
    type(kmoe_optimizer), intent(inout) :: optimizer
    integer, intent(out) :: status
    status = int(c_optimizer_destroy(optimizer%handle))
    optimizer%handle = c_null_ptr
  end subroutine

end module kmoe
