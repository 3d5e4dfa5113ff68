! kmoe from Fortran: build a σ-MoE from JSON, load a checkpoint, run forward and backward and one
! AdamW step, save. Runs alone or under mpirun (experts placed over MPI_COMM_WORLD's ranks).
!
!   sigma_moe_fortran IN.h5 OUT.h5
program sigma_moe_example
  use, intrinsic :: iso_c_binding
  use mpi
  use kmoe
  implicit none
  integer, parameter :: tokens = 32, dmodel = 16
  type(kmoe_layer) :: layer
  type(kmoe_forward) :: state
  type(kmoe_optimizer) :: optimizer
  real(c_float) :: x(tokens, dmodel), y(tokens, dmodel), dy(tokens, dmodel), dx(tokens, dmodel)
  real(c_double) :: reg_loss, local, total
  character(len=512) :: in_path, out_path
  integer :: status, ierr, rank, ranks, i, j

  call MPI_Init(ierr)
  call MPI_Comm_rank(MPI_COMM_WORLD, rank, ierr)
  call MPI_Comm_size(MPI_COMM_WORLD, ranks, ierr)
  if (command_argument_count() /= 2) then
    if (rank == 0) print '(a)', "usage: sigma_moe_fortran IN.h5 OUT.h5"
    call MPI_Finalize(ierr)
    stop 2
  end if
  call get_command_argument(1, in_path)
  call get_command_argument(2, out_path)

  call kmoe_initialize(status)
  call check("kmoe_initialize")
  call kmoe_layer_create(layer, "sigma_moe", '{"dmodel": 16, "n_experts": 4, "expert_size": 8, "k": 2}', status, &
                         seed=42_c_int64_t, mpi_comm=MPI_COMM_WORLD)
  call check("kmoe_layer_create")
  call kmoe_optimizer_create(optimizer, layer, status, lr=1d-2)
  call check("kmoe_optimizer_create")
  call kmoe_layer_load(layer, trim(in_path), status, optimizer=optimizer)
  call check("kmoe_layer_load")

  ! This rank's tokens: x(token, feature).
  do j = 1, dmodel
    do i = 1, tokens
      x(i, j) = sin(0.05 * real((i - 1) * dmodel + j - 1 + rank * tokens * dmodel))
      dy(i, j) = 0.1 * cos(0.03 * real((i - 1) * dmodel + j - 1))
    end do
  end do
  call kmoe_layer_forward(layer, x, .true., state, status)
  call check("kmoe_layer_forward")
  call kmoe_forward_output(state, y, status)
  call check("kmoe_forward_output")
  call kmoe_forward_loss(state, "reg_loss", reg_loss, status)
  call check("kmoe_forward_loss")
  call kmoe_layer_backward(layer, state, dy, 1.0_c_double, dx, status)
  call check("kmoe_layer_backward")
  call kmoe_forward_destroy(state, status)
  call kmoe_optimizer_step(optimizer, status)
  call check("kmoe_optimizer_step")
  call kmoe_layer_save(layer, trim(out_path), status, optimizer=optimizer)
  call check("kmoe_layer_save")

  local = sum(real(y, c_double) * real(dy, c_double))
  call MPI_Allreduce(local, total, 1, MPI_DOUBLE_PRECISION, MPI_SUM, MPI_COMM_WORLD, ierr)
  if (rank == 0) print '(a, i0, a, a, a, f12.6, a, f10.6, a, a)', "sigma_moe (Fortran, ", ranks, " ranks): loaded ", &
      trim(in_path), ", sum(y*dy) = ", total, ", reg_loss = ", reg_loss, ", one AdamW step, saved ", trim(out_path)

  call kmoe_optimizer_destroy(optimizer, status)
  call kmoe_layer_destroy(layer, status)
  call kmoe_finalize(status)
  call MPI_Finalize(ierr)

contains

  subroutine check(what)
    character(len=*), intent(in) :: what
    if (status /= KMOE_OK) then
      print '(a, a, i0, a, a)', what, " failed: status ", status, ": ", kmoe_error_message()
      call MPI_Abort(MPI_COMM_WORLD, 1, ierr)
    end if
  end subroutine

end program
