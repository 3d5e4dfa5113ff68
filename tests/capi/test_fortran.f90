! The Fortran module from Fortran: good calls and bad ones (status and message), Fortran arrays of
! the C ABI's logical shape, float32 and float64 layers, a checkpoint round trip and an AdamW step.
program test_fortran
  use, intrinsic :: iso_c_binding
  use kmoe
  implicit none
  integer :: status, failures, i, j, k
  type(kmoe_layer) :: layer, copy, wide
  type(kmoe_forward) :: state
  type(kmoe_optimizer) :: opt
  real(c_float), allocatable :: x(:, :, :), y(:, :, :), dy(:, :, :), dx(:, :, :), keys(:, :, :), back(:, :, :)
  real(c_float) :: flat(48)
  real(c_double), allocatable :: xd(:, :, :), yd(:, :, :), inferred(:, :, :)
  real(c_double) :: reg
  integer(c_int64_t) :: count
  character(len=*), parameter :: config = '{"dmodel": 8, "n_experts": 4, "expert_size": 6, "k": 2}'
  character(len=64) :: path

  failures = 0
  call kmoe_initialize(status)
  call expect(status, KMOE_OK, "", "initialize")
  if (kmoe_version() /= "0.1.0") call fail("version " // kmoe_version())

  ! Creation, good and bad.
  call kmoe_layer_create(layer, "no_such_layer", config, status)
  call expect(status, KMOE_INVALID_ARGUMENT, "no_such_layer", "unknown layer")
  call kmoe_layer_create(layer, "sigma_moe", '{"dmodel": 8,', status)
  call expect(status, KMOE_INVALID_ARGUMENT, "JSON", "bad JSON")
  call kmoe_layer_create(layer, "sigma_moe", config, status, dtype=7_c_int)
  call expect(status, KMOE_INVALID_ARGUMENT, "dtype", "bad dtype")
  call kmoe_layer_create(layer, "sigma_moe", config, status, seed=3_c_int64_t)
  call expect(status, KMOE_OK, "", "create")
  call kmoe_layer_parameter_count(layer, count, status)
  call expect(status, KMOE_OK, "", "parameter count")
  if (count < 3) call fail("parameter count")

  ! Parameters: Fortran arrays of the C ABI's shape [4, 8, 6].
  allocate(keys(4, 8, 6), back(4, 8, 6))
  call kmoe_layer_get_parameter(layer, "keys", keys, status)
  call expect(status, KMOE_OK, "", "get keys")
  keys = 0.5 * keys + 0.01
  call kmoe_layer_set_parameter(layer, "keys", keys, status)
  call expect(status, KMOE_OK, "", "set keys")
  call kmoe_layer_get_parameter(layer, "keys", back, status)
  if (any(back /= keys)) call fail("keys read back differ")
  call kmoe_layer_get_parameter(layer, "no_such_parameter", back, status)
  call expect(status, KMOE_INVALID_ARGUMENT, "no_such_parameter", "unknown parameter")
  call kmoe_layer_get_parameter(layer, "keys", flat, status)
  call expect(status, KMOE_SHAPE_MISMATCH, "keys", "rank-1 array for keys")

  ! Forward and backward: x(B, T, dmodel).
  allocate(x(2, 3, 8), y(2, 3, 8), dy(2, 3, 8), dx(2, 3, 8))
  do k = 1, 8
    do j = 1, 3
      do i = 1, 2
        x(i, j, k) = sin(0.37 * real(i + 2 * j + 6 * k))
        dy(i, j, k) = 0.3 * cos(0.11 * real(i * j + k))
      end do
    end do
  end do
  call kmoe_layer_forward(layer, x, .true., state, status)
  call expect(status, KMOE_OK, "", "forward")
  call kmoe_forward_output(state, y, status)
  call expect(status, KMOE_OK, "", "output")
  if (.not. all(abs(y) < 1e6)) call fail("output not finite")
  call kmoe_forward_output(state, flat, status)
  call expect(status, KMOE_SHAPE_MISMATCH, "[2, 3, 8]", "output of the wrong shape")
  call kmoe_forward_loss(state, "reg_loss", reg, status)
  call expect(status, KMOE_OK, "", "reg_loss")
  call kmoe_forward_loss(state, "z_loss", reg, status)
  call expect(status, KMOE_INVALID_ARGUMENT, "z_loss", "unknown loss")
  call kmoe_layer_backward(layer, state, dy, 1.0_c_double, dx, status)
  call expect(status, KMOE_OK, "", "backward")
  call kmoe_layer_backward(layer, state, flat, 1.0_c_double, dx, status)
  call expect(status, KMOE_SHAPE_MISMATCH, "grad_output", "backward of the wrong shape")
  call kmoe_forward_destroy(state, status)
  x(1, 1, 1) = transfer(int(z'7FC00000', c_int32_t), 1.0_c_float)  ! NaN
  call kmoe_layer_forward(layer, x, .true., state, status)
  call expect(status, KMOE_NON_FINITE, "input", "NaN input")
  x(1, 1, 1) = 0.5

  ! AdamW and a checkpoint round trip.
  call kmoe_optimizer_create(opt, layer, status, lr=0.01_c_double)
  call expect(status, KMOE_OK, "", "optimizer")
  call kmoe_optimizer_step(opt, status)
  call expect(status, KMOE_OK, "", "step")
  write(path, '(a)') "/tmp/kmoe_fortran_test.h5"
  call kmoe_layer_save(layer, trim(path), status, optimizer=opt)
  call expect(status, KMOE_OK, "", "save")
  call kmoe_layer_save(layer, "/no/such/folder/x.h5", status)
  call expect(status, KMOE_IO_ERROR, "/no/such/folder", "save into a missing folder")
  call kmoe_layer_create(copy, "sigma_moe", config, status, seed=9_c_int64_t)
  call kmoe_layer_load(copy, trim(path), status)
  call expect(status, KMOE_OK, "", "load")
  call kmoe_layer_get_parameter(layer, "keys", keys, status)
  call kmoe_layer_get_parameter(copy, "keys", back, status)
  if (any(back /= keys)) call fail("loaded keys differ")
  call kmoe_layer_create(wide, "sigma_moe", '{"dmodel": 8, "n_experts": 5, "expert_size": 6, "k": 2}', status)
  call kmoe_layer_load(wide, trim(path), status)
  call expect(status, KMOE_INVALID_ARGUMENT, "config", "load into another config")
  call kmoe_layer_load(copy, "/no/such/file.h5", status)
  call expect(status, KMOE_IO_ERROR, "/no/such/file.h5", "load of a missing file")

  ! A float64 layer takes real(c_double) arrays; a real(c_float) one is refused.
  call kmoe_layer_destroy(wide, status)
  call kmoe_layer_create(wide, "sigma_moe", config, status, dtype=KMOE_FLOAT64)
  call expect(status, KMOE_OK, "", "float64 create")
  allocate(xd(2, 3, 8), yd(2, 3, 8))
  xd = real(x, c_double)
  call kmoe_layer_forward(wide, xd, .false., state, status)
  call expect(status, KMOE_OK, "", "float64 forward")
  call kmoe_forward_output(state, yd, status)
  call expect(status, KMOE_OK, "", "float64 output")
  call kmoe_forward_output(state, y, status)
  call expect(status, KMOE_INVALID_ARGUMENT, "KMOE_FLOAT64", "float output of a float64 layer")
  call kmoe_forward_destroy(state, status)
  ! Inference: the eval forward's output, bit for bit.
  allocate(inferred(2, 3, 8))
  call kmoe_layer_infer(wide, xd, inferred, status)
  call expect(status, KMOE_OK, "", "float64 infer")
  if (any(inferred /= yd)) call fail("float64 infer differs from the eval forward's output")
  call kmoe_layer_infer(wide, xd, inferred(:, :, 1:4), status)
  call expect(status, KMOE_SHAPE_MISMATCH, "output", "infer into an array of the wrong shape")

  ! A null handle.
  call kmoe_layer_destroy(copy, status)
  call kmoe_layer_forward(copy, x, .true., state, status)
  call expect(status, KMOE_INVALID_ARGUMENT, "layer", "destroyed (null) layer")

  call kmoe_optimizer_destroy(opt, status)
  call kmoe_layer_destroy(wide, status)
  call kmoe_layer_destroy(layer, status)
  call kmoe_finalize(status)
  call expect(status, KMOE_OK, "", "finalize")
  open(unit=10, file=trim(path), status="old", iostat=i)
  if (i == 0) close(10, status="delete")
  if (failures > 0) then
    print '(i0, a)', failures, " check(s) failed"
    error stop 1
  end if
  print '(a)', "test_fortran: every check passed"

contains

  subroutine expect(got, want, needle, what)
    integer, intent(in) :: got, want
    character(len=*), intent(in) :: needle, what
    character(len=:), allocatable :: message
    message = kmoe_error_message()
    if (got /= want) then
      print '(a, a, i0, a, i0, a, a)', what, ": status ", got, ", expected ", want, "; message: ", message
      failures = failures + 1
    else if (want /= KMOE_OK .and. index(message, needle) == 0) then
      print '(a, a, a, a, a)', what, ": message '", message, "' does not name ", needle
      failures = failures + 1
    else if (want == KMOE_OK .and. len(message) > 0) then
      print '(a, a, a)', what, ": succeeded but left the message ", message
      failures = failures + 1
    end if
  end subroutine

  subroutine fail(what)
    character(len=*), intent(in) :: what
    print '(a, a)', "FAILED: ", what
    failures = failures + 1
  end subroutine

end program
