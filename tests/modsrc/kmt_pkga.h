/* SPDX-License-Identifier: GPL-2.0 */
#ifndef KMT_PKGA_H
#define KMT_PKGA_H
int kmt_pkga_hello(void);
#endif
